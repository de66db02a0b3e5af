"""bitsandbytes NF4 and LLM.int8() inference latency against bf16 (and fp16) on the same model and batches.

The model (~0.68B parameters, Qwen2 layout, random weights from a config) is saved in bf16 to a temporary folder
and loaded four ways on one GPU: bf16, fp16, `quantize_model(path, "nf4")` (NF4, double quantization, bf16
compute) and `quantize_model(path, "int8")`; all stay resident and their forward passes are timed interleaved,
round by round (medians), at each batch size, for a prefill of `--seq-len` tokens and for one token per sequence
(the weight-bound regime of decoding; published anchor: NF4 about 1.4x slower than fp16 at batch 1 on an A100).
Memory: `get_memory_footprint()` and the CUDA memory each load added.

    python benchmarks/gpu/nf4_latency.py                 # GPU
    python benchmarks/gpu/nf4_latency.py --smoke         # CPU, tiny model (bitsandbytes' CPU kernels)

Prints a Markdown table and writes JSON to --json and to $OUT/nf4_latency.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import gc
import shutil

import torch
from common import (
    GPU_MODEL,
    SMOKE_MODEL,
    environment,
    has_cuda,
    interleaved_medians,
    markdown_table,
    num_parameters,
    save_causal_lm,
    sync,
    write_json,
)
from transformers import AutoModelForCausalLM

from hf_compress import quantize_model


def load_variant(path: str, name: str, device_map):
    if name in ("bf16", "fp16"):
        dtype = torch.bfloat16 if name == "bf16" else torch.float16
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
    return quantize_model(path, name, device_map=device_map)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--seq-len", type=int, default=128, help="prefill length (a 1-token row is timed too)")
    parser.add_argument("--variants", default="bf16,fp16,nf4,int8")
    parser.add_argument("--rounds", type=int, default=None, help="default 20 (3 with --smoke)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = has_cuda()
    if not cuda and not args.smoke:
        parser.error("no CUDA device: run with --smoke on CPU")
    spec = SMOKE_MODEL if args.smoke else GPU_MODEL
    rounds = args.rounds or (3 if args.smoke else 20)
    warmup = 1 if args.smoke else args.warmup
    seq = 16 if args.smoke else args.seq_len
    batches = [int(b) for b in args.batches.split(",")]
    names = args.variants.split(",")
    device = "cuda" if cuda else "cpu"
    device_map = {"": 0} if cuda else "cpu"

    path = save_causal_lm(spec)
    models, memory = {}, {}
    try:
        for name in names:
            gc.collect()
            sync()
            before = torch.cuda.memory_allocated() if cuda else None
            models[name] = load_variant(path, name, device_map).eval()
            sync()
            memory[name] = {
                "footprint_bytes": models[name].get_memory_footprint(),
                "cuda_allocated_bytes": (torch.cuda.memory_allocated() - before) if cuda else None,
            }
    finally:
        shutil.rmtree(path, ignore_errors=True)

    g = torch.Generator().manual_seed(0)
    rows, results = [], []
    reference = names[0]
    with torch.inference_mode():
        for b in batches:
            for length in (seq, 1):
                ids = torch.randint(0, spec["vocab_size"], (b, length), generator=g).to(device)
                logits = {n: m(input_ids=ids).logits.float() for n, m in models.items()}
                fns = {n: (lambda m=m, ids=ids: m(input_ids=ids)) for n, m in models.items()}
                t = interleaved_medians(fns, rounds=rounds, warmup=warmup)
                entry = {"batch": b, "seq_len": length, "ms": {n: t[n] * 1e3 for n in names}}
                entry["slowdown_vs_" + reference] = {n: t[n] / t[reference] for n in names}
                entry["max_abs_logit_diff_vs_" + reference] = {
                    n: (logits[n] - logits[reference]).abs().max().item() for n in names
                }
                results.append(entry)
                rows.append([b, length] + [t[n] * 1e3 for n in names] + [t[n] / t[reference] for n in names[1:]])
                del logits

    env = environment()
    gib = 2**30
    print(
        f"# NF4 / int8 / bf16 latency: {env['device']}, bitsandbytes {env['bitsandbytes']}, "
        f"model {num_parameters(spec) / 1e6:.1f}M params, medians of {rounds} interleaved rounds"
    )
    print(
        markdown_table(
            ["batch", "tokens/seq"] + [f"{n} (ms)" for n in names] + [f"{n} / {reference}" for n in names[1:]], rows
        )
    )
    print()
    print(
        markdown_table(
            ["variant", "memory footprint (GiB)", "CUDA allocated by load (GiB)"],
            [
                [
                    n,
                    memory[n]["footprint_bytes"] / gib,
                    None if memory[n]["cuda_allocated_bytes"] is None else memory[n]["cuda_allocated_bytes"] / gib,
                ]
                for n in names
            ],
        )
    )
    payload = {
        "benchmark": "nf4_latency",
        "smoke": args.smoke,
        "env": env,
        "model_parameters": num_parameters(spec),
        "rounds": rounds,
        "memory": memory,
        "latency": results,
    }
    for p in write_json("nf4_latency", payload, args.json):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
