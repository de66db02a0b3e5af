"""Cost of a DistillationTrainer step against a plain student step plus a teacher forward, on the same batches.

Three things are timed, interleaved round by round so machine load affects them alike:
  A. DistillationTrainer: training_step (student fwd + teacher fwd + losses + backward) + optimizer step
  B. plain Trainer on an identical student copy: training_step + optimizer step
  C. the teacher's forward pass alone, under no_grad
and the ratio median(A) / (median(B) + median(C)) is printed (goal: <= 1.05).

    python benchmarks/bench_distillation.py            # both tasks, CPU
    python benchmarks/bench_distillation.py --task causal-lm --rounds 30
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from hf_compress import DistillationConfig, DistillationTrainer


def build(task: str, device: str):
    torch.manual_seed(0)
    if task == "classification":
        cfg = dict(vocab_size=8000, hidden_size=384, num_attention_heads=6, intermediate_size=1536)
        teacher = BertForSequenceClassification(BertConfig(num_hidden_layers=6, **cfg))
        student = BertForSequenceClassification(BertConfig(num_hidden_layers=3, **cfg))
        labels = lambda ids: torch.randint(0, 2, (ids.shape[0],))  # noqa: E731
    else:
        cfg = dict(
            vocab_size=8000, hidden_size=384, num_attention_heads=6, num_key_value_heads=2, intermediate_size=1024
        )
        teacher = LlamaForCausalLM(LlamaConfig(num_hidden_layers=6, **cfg))
        student = LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, **cfg))
        labels = lambda ids: ids.clone()  # noqa: E731
    return teacher.to(device), student.to(device), labels


def batches(n: int, batch_size: int, seq: int, labels, device: str, vocab_size: int = 8000):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab_size, (batch_size, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels(ids)})
    return out


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(
    task: str,
    rounds: int,
    warmup: int,
    batch_size: int,
    seq: int,
    device: str,
    *,
    models: tuple | None = None,
    bf16: bool = False,
    vocab_size: int = 8000,
    fused_lm_head_loss: bool = True,
) -> dict:
    """`models=(teacher, student, labels_fn)` replaces the built-in pair (e.g. a bf16 or 4-bit teacher on a GPU);
    `bf16=True` trains both students under bf16 autocast, as `TrainingArguments(bf16=True)` does."""
    teacher, student, labels = models if models is not None else build(task, device)
    plain_student = copy.deepcopy(student)
    common = dict(
        report_to="none",
        use_cpu=device == "cpu",
        save_strategy="no",
        learning_rate=1e-5,
        disable_tqdm=True,
        bf16=bf16,
    )
    distill = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=DistillationConfig(output_dir="/tmp/bench_d", fused_lm_head_loss=fused_lm_head_loss, **common),
    )
    plain = Trainer(model=plain_student, args=TrainingArguments(output_dir="/tmp/bench_p", **common))
    for t in (distill, plain):
        t.create_optimizer_and_scheduler(num_training_steps=rounds + warmup)
        t.current_gradient_accumulation_steps = 1  # normally set by the training loop
    data = batches(4, batch_size, seq, labels, device, vocab_size)
    teacher.eval()

    def step_distill(b):
        distill.training_step(distill.model, b)
        distill.optimizer.step()
        distill.optimizer.zero_grad()

    def step_plain(b):
        plain.training_step(plain.model, b)
        plain.optimizer.step()
        plain.optimizer.zero_grad()

    def teacher_forward(b):  # as DistillationTrainer runs it: under the trainer's autocast, no grad
        with torch.no_grad(), distill.autocast_smart_context_manager():
            teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    times: dict[str, list[float]] = {"distill": [], "plain": [], "teacher": []}
    fns = {"distill": step_distill, "plain": step_plain, "teacher": teacher_forward}
    for i in range(warmup + rounds):
        b = {k: v.to(device) for k, v in data[i % len(data)].items()}
        order = list(fns) if i % 2 == 0 else list(reversed(fns))  # alternate order against drift
        for name in order:
            sync(device)
            start = time.perf_counter()
            fns[name](b)
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "task": task,
        "distill_step_ms": med["distill"] * 1e3,
        "student_step_ms": med["plain"] * 1e3,
        "teacher_forward_ms": med["teacher"] * 1e3,
        "ratio": med["distill"] / (med["plain"] + med["teacher"]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["classification", "causal-lm", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--materialised", action="store_true", help="causal LM: fused_lm_head_loss=False (full logits)"
    )
    args = parser.parse_args()
    tasks = ["classification", "causal-lm"] if args.task == "both" else [args.task]
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"device {args.device}, batch {args.batch_size}x{args.seq}, {args.rounds} rounds (medians)"
    )
    print("| task | distill step (ms) | student step (ms) | teacher fwd (ms) | ratio (goal <= 1.05) |")
    print("|---|---|---|---|---|")
    for task in tasks:
        r = run(
            task,
            args.rounds,
            args.warmup,
            args.batch_size,
            args.seq,
            args.device,
            fused_lm_head_loss=not args.materialised,
        )
        print(
            f"| {task} | {r['distill_step_ms']:.1f} | {r['student_step_ms']:.1f} | {r['teacher_forward_ms']:.1f} | "
            f"{r['ratio']:.3f} |"
        )


if __name__ == "__main__":
    main()
