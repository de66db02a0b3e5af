"""A distillation + pruning run for the SIGTERM test (tests/test_reliability.py): `full` trains uninterrupted,
`interrupt` trains slowly (so a signal arrives mid-run; run as a script, it is the process signalled), `resume`
continues from the last complete checkpoint. Each writes its final weights and masks to <out>/<mode>.safetensors.
Runs are bit-identical only at the same torch thread count (the test uses one thread everywhere)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_models import lm_dataset, tiny_llama  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_compress import (  # noqa: E402
    DistillationConfig,
    DistillationTrainer,
    GracefulShutdownCallback,
    PruningCallback,
    PruningConfig,
)

MAX_STEPS = 12


class SlowSteps(TrainerCallback):
    """Writes the step reached to a file, and sleeps so the test can signal mid-run."""

    def __init__(self, progress: Path, delay: float):
        self.progress, self.delay = progress, delay

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.write_text(str(state.global_step))
        time.sleep(self.delay)


def run(out: str, mode: str) -> None:
    torch.manual_seed(0)
    folder = Path(out) / mode if mode == "full" else Path(out) / "run"
    args = DistillationConfig(
        output_dir=str(folder),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=100,  # no regular checkpoint before the end: only the signal makes one
        report_to="none",
        use_cpu=True,
        seed=0,
        logging_steps=1,
        disable_tqdm=True,
    )
    pruning = PruningCallback(PruningConfig(sparsity=0.5, schedule="linear", start_step=0, end_step=10, frequency=2))
    # The shutdown callback comes first: it must still exit only after PruningCallback.on_save wrote the masks.
    callbacks = [GracefulShutdownCallback(), pruning]
    if mode == "interrupt":
        callbacks.append(SlowSteps(Path(out) / "progress", delay=0.5))
    trainer = DistillationTrainer(
        model=tiny_llama(layers=2, seed=2),
        teacher_model=tiny_llama(seed=1),
        args=args,
        train_dataset=lm_dataset(64),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    tensors = {f"param.{k}": v.detach().contiguous() for k, v in trainer.model.named_parameters()}
    tensors.update({f"mask.{k}": v.to(torch.uint8) for k, v in pruning.masks.items()})
    save_file(tensors, os.path.join(out, f"{mode}.safetensors"))


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
