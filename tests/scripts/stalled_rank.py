"""One rank of a 2-process gloo run for the stalled-rank test (tests/test_reliability.py): rank 1 stops itself
(SIGSTOP) at the end of step 2, just before PruningCallback broadcasts new masks; rank 0 must fail within the run's
ddp_timeout instead of waiting for it. Started without torchrun (RANK / WORLD_SIZE / MASTER_* in the environment),
so the test controls both processes."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import lm_dataset, tiny_gpt2  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_compress import PruningCallback, PruningConfig  # noqa: E402

STALL_STEP = 2


class StallRankOne(TrainerCallback):
    def __init__(self, marker: Path):
        self.marker = marker

    def on_step_end(self, args, state, control, **kwargs):
        if int(os.environ["RANK"]) == 1 and state.global_step == STALL_STEP:
            self.marker.write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGSTOP)


def main(out: str, timeout_s: int) -> None:
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"),
        max_steps=6,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,  # transformers gives gloo its 30-minute default here, whatever ddp_timeout says
        ddp_backend="gloo",
        ddp_timeout=timeout_s,
        disable_tqdm=True,
    )
    pruning = PruningCallback(PruningConfig(sparsity=0.5, schedule="linear", start_step=0, end_step=4, frequency=2))
    trainer = Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=lm_dataset(64),
        callbacks=[StallRankOne(Path(out) / "stalled_at"), pruning],
    )
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
