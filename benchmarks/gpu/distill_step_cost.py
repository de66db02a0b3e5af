"""Cost of a `DistillationTrainer` step on a GPU, in bf16, with the teacher in bf16 and in 4-bit (NF4).

Runs the timing loop of `benchmarks/bench_distillation.py` (`run`), which times, interleaved round by round:
  A. a DistillationTrainer step (student forward + teacher forward + losses + backward + optimizer step),
  B. a plain Trainer step on an identical copy of the student,
  C. the teacher's forward alone (no grad, under the trainer's autocast),
and reports median(A) / (median(B) + median(C)) (goal <= 1.05), here with `bf16=True` and two teachers:
  - bf16: the ~0.68B teacher (Qwen2 layout from a config) cast to bfloat16;
  - nf4: the same weights loaded 4-bit with `quantize_model(path, "nf4")` (bitsandbytes, bf16 compute).
The student is the same architecture with 6 of the 24 layers (fp32 master weights, bf16 autocast).

    python benchmarks/gpu/distill_step_cost.py            # GPU, batch 8 x 512
    python benchmarks/gpu/distill_step_cost.py --smoke    # CPU, tiny models

Prints a Markdown table and writes JSON to --json and to $OUT/distill_step_cost.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from common import GPU_MODEL, SMOKE_MODEL, build_causal_lm, environment, has_cuda, markdown_table, write_json

from hf_compress import quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_distillation import run  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU")
    parser.add_argument("--teachers", default="bf16,nf4")
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (2 with --smoke)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 512 (16 with --smoke)")
    parser.add_argument("--rounds", type=int, default=None, help="default 20 (3 with --smoke)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = has_cuda()
    if not cuda and not args.smoke:
        parser.error("no CUDA device: run with --smoke on CPU")
    spec = SMOKE_MODEL if args.smoke else GPU_MODEL
    student_spec = {**spec, "num_hidden_layers": 1 if args.smoke else args.student_layers}
    batch_size = args.batch_size or (2 if args.smoke else 8)
    seq = args.seq_len or (16 if args.smoke else 512)
    rounds = args.rounds or (3 if args.smoke else 20)
    warmup = 1 if args.smoke else args.warmup
    device = "cuda" if cuda else "cpu"
    labels = lambda ids: ids.clone()  # noqa: E731

    import tempfile

    folder = tempfile.mkdtemp(prefix="hf_compress_distill_teacher_")
    build_causal_lm(spec, seed=1, dtype=torch.bfloat16).save_pretrained(folder)
    results = {}
    try:
        for kind in args.teachers.split(","):
            if kind == "bf16":
                from transformers import AutoModelForCausalLM

                teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
            elif kind in ("nf4", "int8"):
                teacher = quantize_model(folder, kind, device_map={"": 0} if cuda else "cpu")
            else:
                parser.error(f"--teachers: unknown kind {kind!r} (bf16, nf4, int8)")
            student = build_causal_lm(student_spec, seed=2).to(device)
            results[kind] = run(
                "causal-lm",
                rounds,
                warmup,
                batch_size,
                seq,
                device,
                models=(teacher, student, labels),
                bf16=True,
                vocab_size=spec["vocab_size"],
            )
            results[kind]["teacher_footprint_bytes"] = teacher.get_memory_footprint()
            del teacher, student
            if cuda:
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    env = environment()
    print(
        f"# DistillationTrainer step cost (bf16 autocast): {env['device']}, teacher {spec['num_hidden_layers']} "
        f"layers, student {student_spec['num_hidden_layers']}, batch {batch_size}x{seq}, medians of {rounds} rounds"
    )
    print(
        markdown_table(
            ["teacher", "distill step (ms)", "student step (ms)", "teacher fwd (ms)", "ratio (goal <= 1.05)"],
            [
                [k, r["distill_step_ms"], r["student_step_ms"], r["teacher_forward_ms"], r["ratio"]]
                for k, r in results.items()
            ],
        )
    )
    payload = {
        "benchmark": "distill_step_cost",
        "smoke": args.smoke,
        "env": env,
        "batch_size": batch_size,
        "seq_len": seq,
        "rounds": rounds,
        "results": results,
    }
    for p in write_json("distill_step_cost", payload, args.json):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
