"""QLoRA (`load_qlora_model`, NF4 base) against 16-bit LoRA on the same model: peak GPU memory and step time.

The model (~0.68B parameters, Qwen2 layout, random weights built from a config) is saved in bf16 to a temporary
folder and loaded twice through `hf_compress.load_qlora_model`: once with `load_in_4bit=True` (NF4, double
quantization, bf16 compute) and once with `load_in_4bit=False` (the same LoRA adapters on a bf16 base). Both get
the same adapters (r=16, all Linear layers of the blocks), non-reentrant gradient checkpointing, AdamW on the
adapters and bf16 autocast, i.e. what a `Trainer(bf16=True)` run does.

1. Memory, one variant at a time: peak `torch.cuda.max_memory_allocated` over loading + `--steps` training steps,
   above what was allocated before loading. Goal: QLoRA / LoRA-16 <= 0.4.
2. Step time, both models resident, steps interleaved round by round (medians): forward + backward + AdamW step.

    python benchmarks/gpu/qlora_memory.py                 # GPU, ~0.68B model, batch 4 x 512
    python benchmarks/gpu/qlora_memory.py --smoke         # CPU, tiny model: checks the script runs end to end

Prints a Markdown table and writes JSON to --json and to $OUT/qlora_memory.json when $OUT is set.
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
    skip,
    sync,
    write_json,
)

from hf_compress import load_qlora_model


def load(path: str, quantized: bool, lora_r: int):
    return load_qlora_model(path, "causal-lm", lora_r=lora_r, lora_dropout=0.0, load_in_4bit=quantized)


def make_step(model, batch: dict, device_type: str):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, few steps")
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 (2 with --smoke)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 512 (32 with --smoke)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="steps per variant in the memory phase")
    parser.add_argument("--rounds", type=int, default=None, help="timed interleaved rounds")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = has_cuda()
    if not cuda and not args.smoke:
        parser.error("no CUDA device: run with --smoke on CPU")
    spec = SMOKE_MODEL if args.smoke else GPU_MODEL
    batch_size = args.batch_size or (2 if args.smoke else 4)
    seq = args.seq_len or (32 if args.smoke else 512)
    steps = args.steps or (2 if args.smoke else 5)
    rounds = args.rounds or (3 if args.smoke else 10)
    warmup = 1 if args.smoke else args.warmup
    device = "cuda" if cuda else "cpu"

    path = save_causal_lm(spec)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec["vocab_size"], (batch_size, seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    variants = {"qlora_nf4": True, "lora_bf16": False}
    rows, results = [], {}
    try:
        # 1. memory, one variant at a time
        for name, quantized in variants.items():
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                sync()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            model = load(path, quantized, args.lora_r)
            footprint = model.get_memory_footprint()
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            loaded = torch.cuda.memory_allocated() - base if cuda else None
            step = make_step(model, batch, device)
            losses = [float(step().detach()) for _ in range(steps)]
            sync()
            peak = torch.cuda.max_memory_allocated() - base if cuda else None
            results[name] = {
                "peak_train_bytes": peak,
                "allocated_after_load_bytes": loaded,
                "memory_footprint_bytes": footprint,
                "trainable_parameters": trainable,
                "losses": losses,
            }
            del model, step
        # 2. step time, both resident, interleaved
        models = {name: load(path, quantized, args.lora_r) for name, quantized in variants.items()}
        fns = {name: make_step(m, batch, device) for name, m in models.items()}
        medians = interleaved_medians(fns, rounds=rounds, warmup=warmup)
        for name in variants:
            results[name]["step_seconds_median"] = medians[name]
    finally:
        shutil.rmtree(path, ignore_errors=True)

    q, f = results["qlora_nf4"], results["lora_bf16"]
    ratios = {
        "peak_memory_ratio": (q["peak_train_bytes"] / f["peak_train_bytes"]) if cuda else None,
        "footprint_ratio": q["memory_footprint_bytes"] / f["memory_footprint_bytes"],
        "step_time_ratio": q["step_seconds_median"] / f["step_seconds_median"],
    }
    gib = 2**30
    for name in variants:
        r = results[name]
        rows.append(
            [
                name,
                None if r["peak_train_bytes"] is None else r["peak_train_bytes"] / gib,
                r["memory_footprint_bytes"] / gib,
                r["step_seconds_median"] * 1e3,
                r["trainable_parameters"],
            ]
        )
    env = environment()
    print(
        f"# QLoRA vs 16-bit LoRA: {env['device']}, model {num_parameters(spec) / 1e6:.1f}M params, "
        f"batch {batch_size}x{seq}, r={args.lora_r}, {rounds} interleaved rounds (medians)"
    )
    print(
        markdown_table(
            ["variant", "peak GPU memory (GiB)", "model footprint (GiB)", "step (ms)", "trainable params"], rows
        )
    )
    pm = ratios["peak_memory_ratio"]
    print(
        f"\npeak memory ratio QLoRA / LoRA-16: {'n/a (no CUDA)' if pm is None else f'{pm:.3f}'} (goal <= 0.4); "
        f"footprint ratio {ratios['footprint_ratio']:.3f}; step time ratio {ratios['step_time_ratio']:.3f}"
    )
    if not cuda:
        skip("peak GPU memory needs CUDA; the smoke run reports model footprints and CPU step times only")
    payload = {
        "benchmark": "qlora_memory",
        "smoke": args.smoke,
        "env": env,
        "model_parameters": num_parameters(spec),
        "batch_size": batch_size,
        "seq_len": seq,
        "lora_r": args.lora_r,
        "rounds": rounds,
        "results": results,
        "ratios": ratios,
    }
    for p in write_json("qlora_memory", payload, args.json):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
