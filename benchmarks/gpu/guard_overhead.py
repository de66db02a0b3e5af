"""Step-time cost, on a GPU, of DistillationTrainer's batch guard (`nonfinite="raise"`: ids / labels in range,
finite inputs and loss parts, one host sync per micro-batch, taken after the forward passes and before backward)
against `nonfinite="off"`, in bf16 with the ~0.68B teacher (Qwen2 layout from a config) and a 6-layer student.

Runs the timing loop of `benchmarks/bench_reliability.py` (`run`): both trainers take training_step + optimizer
step on the same batches, interleaved round by round; medians are compared. One measurement per sequence length,
each written to JSON as soon as it is done.

    python benchmarks/gpu/guard_overhead.py                # GPU: batch 8, seq 128 and 512
    python benchmarks/gpu/guard_overhead.py --smoke        # CPU, tiny models

Prints a Markdown table; writes JSON to $OUT/guard_overhead.json ($OUT defaults to benchmarks/gpu/results).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common import GPU_MODEL, SMOKE_MODEL, build_causal_lm, environment, has_cuda, markdown_table, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_reliability import run  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU")
    parser.add_argument("--seq-lens", default=None, help="comma-separated; default 128,512 (16 with --smoke)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (2 with --smoke)")
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=None, help="default 30 (4 with --smoke)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting measurements near this")
    args = parser.parse_args()
    started = time.monotonic()
    cuda = has_cuda()
    if not cuda and not args.smoke:
        parser.error("no CUDA device: run with --smoke on CPU")
    spec = SMOKE_MODEL if args.smoke else GPU_MODEL
    seq_lens = [int(s) for s in (args.seq_lens or ("16" if args.smoke else "128,512")).split(",")]
    batch_size = args.batch_size or (2 if args.smoke else 8)
    rounds = args.rounds or (4 if args.smoke else 30)
    warmup = 1 if args.smoke else args.warmup
    device = "cuda" if cuda else "cpu"
    teacher = build_causal_lm(spec, seed=1).to(device)
    student = build_causal_lm({**spec, "num_hidden_layers": 1 if args.smoke else args.student_layers}, seed=2)
    payload = {"environment": environment(), "batch_size": batch_size, "rounds": rounds, "results": []}
    out = os.environ.get("OUT", "benchmarks/gpu/results")
    os.environ["OUT"] = out
    rows = []
    for seq in seq_lens:
        elapsed = time.monotonic() - started
        if payload["results"] and elapsed > args.budget_s * 0.6:
            print(f"budget: {elapsed:.0f} s of {args.budget_s:.0f} s used; not starting seq {seq}")
            break
        result = run(
            "causal-lm",
            rounds,
            warmup,
            batch_size,
            seq,
            spec["vocab_size"],
            spec["hidden_size"],
            models=(teacher, student, lambda ids: ids.clone()),
            device=device,
            bf16=cuda,
        )
        result["seq"] = seq
        payload["results"].append(result)
        write_json("guard_overhead", payload)
        rows.append(
            [
                seq,
                result["guarded_ms"],
                result["unguarded_ms"],
                f"{100 * result['overhead']:+.1f}%",
                result["guard_us"],
            ]
        )
    print(f"# {payload['environment']['device']}, batch {batch_size}, {rounds} rounds (medians), bf16={cuda}")
    print(
        markdown_table(
            ["seq", "nonfinite='raise' step (ms)", "nonfinite='off' step (ms)", "overhead", "guard alone (us)"], rows
        )
    )


if __name__ == "__main__":
    main()
