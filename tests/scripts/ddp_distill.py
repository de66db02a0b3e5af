"""Run under `torchrun --nproc_per_node 2`: distill with DDP (gloo on CPU) and dump each rank's student."""

import json
import sys
from pathlib import Path

import torch
from tiny_models import classification_dataset, tiny_bert

from hf_compress import DistillationConfig, DistillationTrainer

out = Path(sys.argv[1])
student, teacher = tiny_bert(layers=1, seed=2), tiny_bert(seed=1)
initial = {k: v.clone() for k, v in student.state_dict().items()}
args = DistillationConfig(
    output_dir=str(out / "run"),
    max_steps=4,
    per_device_train_batch_size=4,
    report_to="none",
    use_cpu=True,
    save_strategy="no",
    learning_rate=1e-2,
    seed=0,
    disable_tqdm=True,
    ddp_backend="gloo",
    hidden_loss_weight=1.0,
)
trainer = DistillationTrainer(
    model=student, teacher_model=teacher, args=args, train_dataset=classification_dataset(64)
)
trainer.train()
rank = trainer.args.process_index
torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, out / f"rank{rank}.pt")
if rank == 0:
    info = {
        "world_size": trainer.args.world_size,
        "changed": any(not torch.equal(initial[k], v) for k, v in student.state_dict().items()),
        "teacher_is_ddp": isinstance(trainer.teacher_model, torch.nn.parallel.DistributedDataParallel),
    }
    (out / "rank0.json").write_text(json.dumps(info))
torch.distributed.destroy_process_group()  # see tests/torchrun_utils.py
