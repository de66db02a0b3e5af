"""Knowledge distillation: `DistillationTrainer`, its config, pure losses, student creation and teacher caching."""

from .cache import CachedTeacherLogits, cache_teacher_logits
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
from .sparse_losses import sparse_distillation_loss, sparse_forward_kl_and_cross_entropy
from .trainer import DistillationTrainer

__all__ = [
    "CachedTeacherLogits",
    "DistillationConfig",
    "DistillationTrainer",
    "cache_teacher_logits",
    "create_student",
    "distillation_loss",
    "forward_kl_loss",
    "fused_linear_distillation_loss",
    "hidden_state_loss",
    "jsd_loss",
    "mse_logits_loss",
    "reverse_kl_loss",
    "sparse_distillation_loss",
    "sparse_forward_kl_and_cross_entropy",
]


def __getattr__(name):
    if name == "create_student":  # lives with the model-surgery code; imported on first use
        from .student import create_student

        return create_student
    raise AttributeError(name)
