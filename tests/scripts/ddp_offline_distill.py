"""Run under `torchrun --nproc_per_node 2`: distill from a teacher cache with DDP (gloo on CPU), dump each rank's student.

argv: output folder, cache folder (made by cache_teacher_logits in the calling test).
"""

import json
import sys
from pathlib import Path

import datasets
import torch
from tiny_models import tiny_llama

from hf_compress import DistillationConfig, DistillationTrainer

out, cache = Path(sys.argv[1]), sys.argv[2]


def pad(features):
    width = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        n = width - len(f["input_ids"])
        batch["input_ids"].append(list(f["input_ids"]) + [0] * n)
        batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * n)
        batch["labels"].append(list(f["labels"]) + [-100] * n)
    return {k: torch.tensor(v) for k, v in batch.items()}


student = tiny_llama(layers=1, seed=2)
initial = {k: v.clone() for k, v in student.state_dict().items()}
args = DistillationConfig(
    output_dir=str(out / "run"),
    max_steps=3,
    per_device_train_batch_size=2,
    report_to="none",
    use_cpu=True,
    save_strategy="no",
    learning_rate=1e-2,
    temperature=2.0,
    seed=0,
    disable_tqdm=True,
    ddp_backend="gloo",
    logging_steps=1,
)
trainer = DistillationTrainer(
    model=student, teacher_model=None, args=args, train_dataset=datasets.load_from_disk(cache), data_collator=pad
)
trainer.train()
rank = trainer.args.process_index
torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, out / f"rank{rank}.pt")
if rank == 0:
    info = {
        "world_size": trainer.args.world_size,
        "changed": any(not torch.equal(initial[k], v) for k, v in student.state_dict().items()),
        "loss_distill": [h["loss_distill"] for h in trainer.state.log_history if "loss_distill" in h],
    }
    (out / "rank0.json").write_text(json.dumps(info))
