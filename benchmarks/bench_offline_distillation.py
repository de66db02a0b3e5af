"""Offline distillation on CPU: bytes per token of cached SmolLM2 targets, and the cost of the loss on them.

1. `cache_teacher_logits` with SmolLM2-135M-Instruct (`smollm2_folder()`) on the first --blocks 512-token blocks of
   WikiText-2 train, temperature 1: `sampled` (64 and 32 draws) and `topk` (64 and 100): bytes per token of the
   stored targets (they depend on the teacher's entropy for `sampled`) and caching throughput.
2. Forward + backward of the loss alone on --rows x 49152 logits, timed interleaved (medians): cross-entropy,
   the online fused forward KL + cross-entropy (dense teacher logits), and the sparse-target loss on `topk` 64 and
   `sampled` 64 targets (alpha 0.5, T = 1).

    python benchmarks/bench_offline_distillation.py --blocks 16
    python benchmarks/bench_offline_distillation.py --skip-cache --rows 1024

Prints Markdown tables; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
from common import markdown_table  # noqa: E402
from offline_distill import default_data_dir, tokenize_blocks  # noqa: E402

from hf_compress import cache_teacher_logits, smollm2_folder, sparse_forward_kl_and_cross_entropy  # noqa: E402
from hf_compress.distillation.cache import sampled_targets, topk_targets  # noqa: E402
from hf_compress.distillation.losses import fused_forward_kl_and_cross_entropy  # noqa: E402

CACHES = (("sampled", 64), ("sampled", 32), ("topk", 64), ("topk", 100))


def bytes_per_token(blocks: int, data_dir: str) -> list[dict]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = tokenize_blocks(Path(data_dir) / "train.txt", tokenizer, 512, blocks * 512)
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    results = []
    for method, k in CACHES:
        with tempfile.TemporaryDirectory() as folder_out:
            kw = {"top_k": k} if method == "topk" else {"num_samples": k}
            r = cache_teacher_logits(
                teacher, dataset, folder_out, method=method, temperature=1.0, batch_size=4, progress=False, **kw
            )
            results.append(
                {
                    "method": method,
                    "k": k,
                    "tokens": r.num_positions,
                    "bytes_per_token": round(r.bytes_per_token, 1),
                    "cache_s": round(r.seconds, 1),
                    "tokens_per_s": round(r.num_positions / r.seconds, 1),
                }
            )
        print(results[-1], flush=True)
    return results


def loss_cost(rows: int, vocab: int, rounds: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(rows, vocab, generator=g) * 3
    teacher = torch.randn(rows, vocab, generator=g) * 4
    labels = torch.randint(0, vocab, (rows,), generator=g)
    ids, probs, rest = topk_targets(teacher, 64, 1.0, True)
    s_ids, counts, num_unique, neg_entropy = sampled_targets(teacher, 64, 1.0, generator=g)
    width = int(num_unique.max())
    sampled_ids = torch.zeros(rows, width, dtype=torch.long)
    sampled_probs = torch.zeros(rows, width)
    row = torch.repeat_interleave(torch.arange(rows), num_unique)
    slot = torch.arange(len(row)) - torch.repeat_interleave(torch.cumsum(num_unique, 0) - num_unique, num_unique)
    sampled_ids[row, slot] = s_ids
    sampled_probs[row, slot] = counts.float() / 64
    losses = {
        "cross-entropy": lambda x: F.cross_entropy(x, labels, reduction="sum"),
        "online fused KL + CE": lambda x: fused_forward_kl_and_cross_entropy(x, teacher, labels, 1.0, 0.5)[0],
        "cached topk 64": lambda x: sparse_forward_kl_and_cross_entropy(x, ids, probs, rest, None, labels, 1.0, 0.5)[
            0
        ],
        "cached sampled 64": lambda x: sparse_forward_kl_and_cross_entropy(
            x, sampled_ids, sampled_probs, None, neg_entropy, labels, 1.0, 0.5
        )[0],
    }
    times: dict[str, list[float]] = {name: [] for name in losses}
    names = list(losses)
    for i in range(rounds + 1):
        for name in names if i % 2 == 0 else reversed(names):
            x = student.clone().requires_grad_()
            start = time.perf_counter()
            losses[name](x).backward()
            if i:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=16, help="512-token blocks of WikiText-2 train to cache")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip-cache", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = {"threads": torch.get_num_threads()}
    if not args.skip_cache:
        out["cache"] = bytes_per_token(args.blocks, args.data_dir)
        print(
            markdown_table(
                ["method", "k", "tokens", "bytes/token", "cache s", "tokens/s"],
                [
                    [r["method"], r["k"], r["tokens"], r["bytes_per_token"], r["cache_s"], r["tokens_per_s"]]
                    for r in out["cache"]
                ],
            )
        )
    out["loss_ms"] = loss_cost(args.rows, args.vocab, args.rounds)
    ce = out["loss_ms"]["cross-entropy"]
    print(
        f"\nLoss forward + backward, {args.rows} x {args.vocab} fp32 logits, medians of {args.rounds} interleaved rounds"
    )
    print(markdown_table(["loss", "ms", "vs cross-entropy"], [[k, v, v / ce] for k, v in out["loss_ms"].items()]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
