"""Run under `torchrun --nproc_per_node 2` (gloo, CPU): the fused LM-head loss under DDP and FSDP2.

DDP: `DistillationTrainer` trains a causal LM with the fused loss and with materialised logits; each rank saves its
final student. FSDP2 (torch's `fully_shard`, laid out as accelerate does it: one group per decoder layer, the final
norm and head in one group kept unsharded after forward, the root): the fused loss from captured hidden states and
the gathered heads against the materialised loss on the same sharded models; each rank saves the full gradients.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tiny_models import ListDataset, tiny_llama

from hf_compress import DistillationConfig, DistillationTrainer, distillation_loss, fused_linear_distillation_loss
from hf_compress.distillation.lm_head import HeadInputCapture, UnsupportedHead, find_output_head, head_parameters

out = Path(sys.argv[1])


def ddp_part() -> int:
    teacher = tiny_llama(seed=1)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(1, 96, (12,), generator=g)), "labels": ids.clone()} for _ in range(16)]
    for fused in (True, False):
        student = tiny_llama(layers=1, seed=2)
        args = DistillationConfig(
            output_dir=str(out / f"run_{fused}"),
            max_steps=3,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            optim="sgd",
            learning_rate=0.5,
            seed=0,
            disable_tqdm=True,
            ddp_backend="gloo",
            fused_lm_head_loss=fused,
            fused_lm_head_chunk_size=6,
        )
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ListDataset(rows))
        trainer.train()
        assert (trainer._fused_lm_heads is not None) == fused
        rank = trainer.args.process_index
        state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
        torch.save(state, out / f"ddp_{'fused' if fused else 'plain'}_rank{rank}.pt")
    return trainer.args.world_size


def fsdp2_part() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rank = dist.get_rank()

    def sharded(model, head_reshard_after_forward):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard([model.model.norm, model.lm_head], mesh=mesh, reshard_after_forward=head_reshard_after_forward)
        fully_shard(model, mesh=mesh)
        return model

    g = torch.Generator().manual_seed(10 + rank)  # each rank its own batch, as data parallelism gives it
    ids = torch.randint(1, 96, (2, 9), generator=g)
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)
    labels[0, :2] = -100
    mask = labels != -100
    # The teacher's head group is resharded after forward, so its head is a DTensor there (gathered by the loss).
    teacher = sharded(tiny_llama(seed=1), True)
    seen = {}

    def grads(fused: bool) -> dict:
        student = sharded(tiny_llama(layers=1, seed=2), False)
        if fused:
            s_head, t_head = find_output_head(student), find_output_head(teacher)
            with HeadInputCapture(s_head.module) as s_cap:
                student(input_ids=ids)
            with torch.no_grad(), HeadInputCapture(t_head.module) as t_cap:
                teacher(input_ids=ids)
            s_weight, _ = head_parameters(s_head, student=True)
            t_weight, _ = head_parameters(t_head, student=False)
            seen["teacher_head_after_forward"] = type(t_head.module.weight).__name__
            seen["student_head_after_forward"] = type(s_head.module.weight).__name__
            total, *_ = fused_linear_distillation_loss(
                s_cap.hidden, s_weight, t_cap.hidden, t_weight, labels, mask=mask, chunk_size=5
            )
        else:
            s_logits = student(input_ids=ids).logits
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits
            total = 0.5 * distillation_loss(s_logits, t_logits, "forward_kl", 2.0, mask=mask, reduction="sum")
            total = total + 0.5 * F.cross_entropy(s_logits.reshape(-1, 96), labels.reshape(-1), reduction="sum")
        (total / mask.sum()).backward()
        return {n: p.grad.full_tensor().clone() for n, p in student.named_parameters()}

    fused, plain = grads(True), grads(False)
    torch.save({"fused": fused, "plain": plain}, out / f"fsdp2_rank{rank}.pt")
    resharded = sharded(tiny_llama(layers=1, seed=2), True)
    head = find_output_head(resharded)
    with HeadInputCapture(head.module):
        resharded(input_ids=ids)
    try:
        head_parameters(head, student=True)
        refused = None
    except UnsupportedHead as err:
        refused = str(err)
    return {"resharded_student_head_refused": refused, **seen}


world = ddp_part()
info = {"world_size": world, **fsdp2_part()}
if dist.get_rank() == 0:
    (out / "rank0.json").write_text(json.dumps(info))
dist.barrier()
dist.destroy_process_group()
