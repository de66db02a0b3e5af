"""Step-time cost of DistillationTrainer's batch guard (nonfinite="raise": finite inputs, ids and labels in range,
finite loss parts, one host sync per micro-batch) against nonfinite="off", on the same batches.

Two trainers on identical student copies and one shared teacher run training_step + optimizer step, interleaved
round by round (alternating order) so machine load affects both alike; medians are compared.

    python benchmarks/bench_reliability.py                  # both tasks, CPU, one thread
    python benchmarks/bench_reliability.py --rounds 60 --vocab 32000
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from hf_compress import DistillationConfig, DistillationTrainer


def build(task: str, vocab: int, hidden: int):
    torch.manual_seed(0)
    if task == "classification":
        cfg = dict(vocab_size=vocab, hidden_size=hidden, num_attention_heads=4, intermediate_size=4 * hidden)
        return (
            BertForSequenceClassification(BertConfig(num_hidden_layers=4, **cfg)),
            BertForSequenceClassification(BertConfig(num_hidden_layers=2, **cfg)),
            lambda ids: torch.randint(0, 2, (ids.shape[0],)),
        )
    cfg = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=4 * hidden,
    )
    return (
        LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, **cfg)),
        LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **cfg)),
        lambda ids: ids.clone(),
    )


def run(
    task: str,
    rounds: int,
    warmup: int,
    batch_size: int,
    seq: int,
    vocab: int,
    hidden: int,
    *,
    models: tuple | None = None,
    device: str = "cpu",
    bf16: bool = False,
) -> dict:
    """`models=(teacher, student, labels_fn)` replaces the built-in pair (benchmarks/gpu/guard_overhead.py)."""
    teacher, student, labels = models if models is not None else build(task, vocab, hidden)
    common = dict(
        report_to="none", use_cpu=device == "cpu", save_strategy="no", learning_rate=1e-5, disable_tqdm=True, bf16=bf16
    )
    trainers = {}
    for policy in ("raise", "off"):
        trainer = DistillationTrainer(
            model=copy.deepcopy(student),
            teacher_model=teacher,
            args=DistillationConfig(output_dir=f"/tmp/bench_guard_{policy}", nonfinite=policy, **common),
        )
        trainer.create_optimizer_and_scheduler(num_training_steps=rounds + warmup)
        trainer.current_gradient_accumulation_steps = 1  # normally set by the training loop
        trainers[policy] = trainer
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(4):
        ids = torch.randint(5, vocab, (batch_size, seq), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels(ids)}
        data.append({k: v.to(device) for k, v in batch.items()})

    def step(trainer, batch):
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times = {policy: [] for policy in trainers}
    for i in range(warmup + rounds):
        batch = data[i % len(data)]
        order = list(trainers) if i % 2 == 0 else list(reversed(trainers))
        for policy in order:
            sync()
            start = time.perf_counter()
            step(trainers[policy], batch)
            sync()
            if i >= warmup:
                times[policy].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    # The guard's own work on one batch (ids / labels range flags, loss-part flags, the one host sync), timed alone.
    from hf_compress.distillation.guard import bad_parts, loss_flags, prepare_batch_checks

    trainer, batch = trainers["raise"], data[0]
    parts = {name: torch.tensor(value, device=device) for name, value in (("loss", 1.0), ("loss_distill", 0.5))}
    guard_times = []
    for _ in range(200):
        sync()
        start = time.perf_counter()
        _, flags = prepare_batch_checks(
            batch, input_id_limit=trainer._input_id_limit, label_limit=trainer._label_limit
        )
        flags.update(loss_flags(parts))
        bad_parts(flags)
        guard_times.append(time.perf_counter() - start)
    return {
        "guard_us": statistics.median(guard_times) * 1e6,
        "task": task,
        "guarded_ms": med["raise"] * 1e3,
        "unguarded_ms": med["off"] * 1e3,
        "overhead": med["raise"] / med["off"] - 1.0,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["classification", "causal-lm", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = ["classification", "causal-lm"] if args.task == "both" else [args.task]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
        f"load average {load:.1f}, batch {args.batch_size}x{args.seq}, vocab {args.vocab}, hidden {args.hidden}, "
        f"{args.rounds} rounds (medians)"
    )
    print("| task | nonfinite='raise' step (ms) | nonfinite='off' step (ms) | overhead | guard alone (us) |")
    print("|---|---:|---:|---:|---:|")
    for task in tasks:
        r = run(task, args.rounds, args.warmup, args.batch_size, args.seq, args.vocab, args.hidden)
        print(
            f"| {task} | {r['guarded_ms']:.2f} | {r['unguarded_ms']:.2f} | {100 * r['overhead']:+.1f}% | "
            f"{r['guard_us']:.0f} |"
        )


if __name__ == "__main__":
    main()
