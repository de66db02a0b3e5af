"""Knowledge distillation: `DistillationTrainer`, its config, pure losses and student creation."""

from .config import DistillationConfig
from .losses import (
    distillation_loss,
    forward_kl_loss,
    fused_linear_distillation_loss,
    hidden_state_loss,
    jsd_loss,
    mse_logits_loss,
    reverse_kl_loss,
)
from .trainer import DistillationTrainer

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "create_student",
    "distillation_loss",
    "forward_kl_loss",
    "fused_linear_distillation_loss",
    "hidden_state_loss",
    "jsd_loss",
    "mse_logits_loss",
    "reverse_kl_loss",
]


def __getattr__(name):
    if name == "create_student":  # lives with the model-surgery code; imported on first use
        from .student import create_student

        return create_student
    raise AttributeError(name)
