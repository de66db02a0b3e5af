"""Markdown table of the `accelerate_<type>[_peft]_n<N>.json` files `distill_prune_qat.py` writes to `$OUT`.

    python examples/accelerate/summarize_results.py [DIR]     # default: $OUT, else examples/accelerate/results

Writes `<DIR>/accelerate_matrix.json` with one row per run (what the table shows).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def row(r: dict) -> dict:
    memory = r.get("teacher_memory") or []
    held = [m["teacher_local_param_bytes"] for m in memory]
    full = memory[0]["teacher_full_param_bytes"] if memory else None
    peak = [m.get("cuda_max_allocated_train") for m in memory]
    q = r.get("quantized_reload") or {}
    return {
        "config": r["distributed_type"],
        "N": r["world_size"],
        "student": "LoRA" if r["peft"] else "full",
        "passed": not r["failures"],
        "failures": r["failures"],
        "steps": r["global_step"],
        "loss_first": r["loss_first"],
        "loss_last": r["loss_last"],
        "final_sparsity": r["final_sparsity"],
        "masks_identical_every_step": r["masks_identical_every_step"],
        "qat_inserted_at": r["qat_inserted_at"],
        "teacher_share_per_rank": [h / full for h in held] if full else None,
        "peak_gib_per_rank": [None if p is None else p / 2**30 for p in peak],
        "reload_max_abs_logit_diff": r["reload"]["max_abs_logit_diff"],
        "quantized_argmax_agreement": q.get("argmax_agreement"),
    }


def main(argv: list[str]) -> int:
    folder = Path(argv[0] if argv else os.environ.get("OUT", "examples/accelerate/results"))
    rows = []
    for path in sorted(folder.glob("accelerate_*_n*.json")):
        try:
            rows.append(row(json.loads(path.read_text())))
        except (KeyError, json.JSONDecodeError) as err:
            print(f"{path.name}: unreadable ({type(err).__name__}: {err})")
    if not rows:
        print(f"no accelerate_*_n*.json in {folder}")
        return 1
    header = [
        "config",
        "N",
        "student",
        "checks",
        "loss first -> last",
        "sparsity",
        "masks held every step",
        "QAT at",
        "teacher share per rank",
        "peak GiB per rank",
        "reload diff",
        "int4 argmax agr.",
    ]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for x in rows:
        share = (
            "-" if x["teacher_share_per_rank"] is None else ", ".join(f"{v:.2f}" for v in x["teacher_share_per_rank"])
        )
        peak = ", ".join("-" if p is None else f"{p:.1f}" for p in x["peak_gib_per_rank"])
        agreement = "-" if x["quantized_argmax_agreement"] is None else f"{x['quantized_argmax_agreement']:.3f}"
        print(
            f"| {x['config']} | {x['N']} | {x['student']} | {'pass' if x['passed'] else 'FAIL'} | "
            f"{x['loss_first']:.3f} -> {x['loss_last']:.3f} | {x['final_sparsity']:.3f} | "
            f"{x['masks_identical_every_step']} | {x['qat_inserted_at']} | {share} | {peak} | "
            f"{x['reload_max_abs_logit_diff']:.3g} | {agreement} |"
        )
    (folder / "accelerate_matrix.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(x["passed"] for x in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
