"""QLoRA (`load_qlora_model`, NF4 base) against 16-bit LoRA on the same model: peak GPU memory and step time.

The model is a Llama built from a config with random weights: `--model 7b` (Llama-2-7B shape, 6.7B parameters, the
default) or `--model 0.7b` (the ~0.68B Qwen2 layout of the other GPU benchmarks). Its weights are made once, in CPU
memory (bf16), and handed to `load_qlora_model(config, state_dict=...)` twice: `load_in_4bit=True` (NF4, double
quantization, bf16 compute; each tensor is quantized as it is loaded, so the 16-bit model never exists whole on the
GPU) and `load_in_4bit=False` (the same LoRA adapters on a bf16 base). Nothing is written to disk. Both get the same
adapters (r=16, every Linear of the blocks), non-reentrant gradient checkpointing, AdamW on the adapters and bf16
autocast, i.e. what a `Trainer(bf16=True)` run does.

1. Memory, one variant at a time: peak `torch.cuda.max_memory_allocated` over loading, and over loading + `--steps`
   training steps at each batch size of `--batch-sizes` (x `--seq-len`), above what was allocated before loading.
   Goal: QLoRA / LoRA-16 <= 0.45 (7B, 2,048 tokens per row). Step times are the medians of those steps after the
   first.
2. `--rounds N` (default 10 for 0.7b, 0 for 7b): step time with both models resident, steps interleaved round by
   round (medians), at the first batch size.

Under `accelerate launch` with several processes (`--ddp`), each rank loads the QLoRA model on its own GPU and a
`transformers.Trainer` trains the adapters under DDP for `--steps` steps; rank 0 writes `qlora_ddp.json`: per-rank
peak memory, step time, and whether the adapters are identical on every rank afterwards.

    python benchmarks/gpu/qlora_memory.py                                  # GPU, 7B, batch 1, 2, 4 x 2048
    python benchmarks/gpu/qlora_memory.py --model 0.7b --batch-sizes 4 --seq-len 512
    accelerate launch --config_file examples/accelerate/ddp.yaml benchmarks/gpu/qlora_memory.py --ddp
    python benchmarks/gpu/qlora_memory.py --smoke                          # CPU, tiny model: the same code runs

Prints a Markdown table and writes JSON to --json and to $OUT/qlora_memory.json (or qlora_ddp.json) when $OUT is
set, after every measurement. `--budget-s` stops starting new measurements when the budget is close.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py when launched by accelerate

from common import (  # noqa: E402
    GPU_MODEL,
    SMOKE_MODEL,
    environment,
    has_cuda,
    interleaved_medians,
    markdown_table,
    skip,
    sync,
    write_json,
)

from hf_compress import load_qlora_model  # noqa: E402

LLAMA_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=11008,
)
MODELS = {"7b": ("llama", LLAMA_7B), "0.7b": ("qwen2", GPU_MODEL), "smoke": ("llama", SMOKE_MODEL)}


def make_config(name: str, seq_len: int):
    from transformers import LlamaConfig, Qwen2Config

    family, spec = MODELS[name]
    cls = LlamaConfig if family == "llama" else Qwen2Config
    return cls(max_position_embeddings=max(2048, seq_len), tie_word_embeddings=False, use_cache=False, **spec)


@torch.no_grad()
def random_state_dict(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 weights for `config` in CPU memory: normal(0, initializer_range), norms at 1. Generated tensor by tensor
    on the GPU when there is one (fast), then copied to CPU."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    device = "cuda" if has_cuda() else "cpu"
    generator = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, tensor in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(tensor.shape, dtype=torch.bfloat16)
        else:
            value = torch.empty(tensor.shape, dtype=torch.bfloat16, device=device)
            value.normal_(0.0, config.initializer_range, generator=generator)
            out[name] = value.cpu()
    return out


def num_parameters(state_dict) -> int:
    return sum(t.numel() for t in state_dict.values())


def load(config, state_dict, quantized: bool, lora_r: int):
    return load_qlora_model(
        config, "causal-lm", lora_r=lora_r, lora_dropout=0.0, load_in_4bit=quantized, state_dict=state_dict
    )


def make_batch(batch_size: int, seq: int, vocab: int, device: str) -> dict:
    g = torch.Generator().manual_seed(batch_size)
    ids = torch.randint(0, vocab, (batch_size, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


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


def timed(fn) -> tuple[float, float]:
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - start, float(value.detach())


# --------------------------------------------------------------------------------------------------- one GPU
def memory_benchmark(args, cuda: bool, started: float) -> dict:
    device = "cuda" if cuda else "cpu"
    config = make_config(args.model, args.seq_len)
    t0 = time.perf_counter()
    state_dict = random_state_dict(config)
    print(f"random {args.model} weights in CPU memory: {time.perf_counter() - t0:.1f} s", flush=True)
    variants = {"qlora_nf4": True, "lora_bf16": False}
    payload = {
        "benchmark": "qlora_memory",
        "smoke": args.smoke,
        "env": environment(),
        "model": args.model,
        "model_parameters": num_parameters(state_dict),
        "batch_sizes": args.batch_sizes,
        "seq_len": args.seq_len,
        "lora_r": args.lora_r,
        "steps": args.steps,
        "results": {},
        "skipped": [],
    }

    def over_budget(estimate: float) -> bool:
        return args.budget_s is not None and time.perf_counter() - started + estimate > args.budget_s

    for name, quantized in variants.items():
        if over_budget(args.estimate_load_s):
            payload["skipped"].append(f"{name}: load (budget)")
            continue
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model = load(config, state_dict, quantized, args.lora_r)
        sync()
        result = {
            "load_seconds": time.perf_counter() - t0,
            "load_peak_bytes": torch.cuda.max_memory_allocated() - base if cuda else None,
            "allocated_after_load_bytes": torch.cuda.memory_allocated() - base if cuda else None,
            "memory_footprint_bytes": model.get_memory_footprint(),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "per_batch": {},
        }
        payload["results"][name] = result
        for batch_size in args.batch_sizes:
            estimate = args.steps * args.estimate_step_s * batch_size
            if over_budget(estimate):
                payload["skipped"].append(f"{name}: batch {batch_size} (budget)")
                continue
            batch = make_batch(batch_size, args.seq_len, config.vocab_size, device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            step = make_step(model, batch, device)
            times, losses = [], []
            for _ in range(args.steps):
                seconds, loss = timed(step)
                times.append(seconds)
                losses.append(loss)
            train_peak = torch.cuda.max_memory_allocated() - base if cuda else None
            result["per_batch"][str(batch_size)] = {
                "train_peak_bytes": train_peak,
                "peak_over_load_and_train_bytes": None
                if train_peak is None
                else max(train_peak, result["load_peak_bytes"]),
                "step_seconds": times,
                "step_seconds_median": statistics.median(times[1:] or times),
                "losses": losses,
            }
            del step, batch
            gc.collect()
            write_json("qlora_memory", payload, args.json)
        if args.rounds and name == list(variants)[-1] and not over_budget(2 * args.rounds * args.estimate_step_s):
            payload["interleaved"] = interleaved_phase(args, config, state_dict, device, model)
        del model
        gc.collect()
        write_json("qlora_memory", payload, args.json)

    payload["ratios"] = ratios(payload["results"])
    write_json("qlora_memory", payload, args.json)
    return payload


def interleaved_phase(args, config, state_dict, device: str, lora_model) -> dict:
    """Step time with both models resident, interleaved round by round, at the first batch size."""
    batch = make_batch(args.batch_sizes[0], args.seq_len, config.vocab_size, device)
    models = {"qlora_nf4": load(config, state_dict, True, args.lora_r), "lora_bf16": lora_model}
    fns = {name: make_step(m, batch, device) for name, m in models.items()}
    medians = interleaved_medians(fns, rounds=args.rounds, warmup=args.warmup)
    del models, fns
    return {"batch_size": args.batch_sizes[0], "rounds": args.rounds, "step_seconds_median": medians}


def ratios(results: dict) -> dict:
    q, f = results.get("qlora_nf4"), results.get("lora_bf16")
    out = {}
    if not q or not f:
        return out
    for b, qb in q["per_batch"].items():
        fb = f["per_batch"].get(b)
        if fb is None:
            continue
        out[b] = {
            "peak_memory_ratio": (
                qb["peak_over_load_and_train_bytes"] / fb["peak_over_load_and_train_bytes"]
                if qb["peak_over_load_and_train_bytes"]
                else None
            ),
            "step_time_ratio": qb["step_seconds_median"] / fb["step_seconds_median"],
        }
    out["footprint_ratio"] = q["memory_footprint_bytes"] / f["memory_footprint_bytes"]
    if q["load_peak_bytes"]:
        out["load_peak_ratio"] = q["load_peak_bytes"] / f["load_peak_bytes"]
    return out


def print_memory_table(payload: dict, cuda: bool) -> None:
    gib = 2**30
    rows = []
    for name, r in payload["results"].items():
        for b, rb in r["per_batch"].items():
            peak = rb["peak_over_load_and_train_bytes"]
            rows.append(
                [
                    name,
                    int(b),
                    None if r["load_peak_bytes"] is None else r["load_peak_bytes"] / gib,
                    None if peak is None else peak / gib,
                    r["memory_footprint_bytes"] / gib,
                    rb["step_seconds_median"] * 1e3,
                    r["trainable_parameters"],
                ]
            )
    print(
        f"# QLoRA vs 16-bit LoRA: {payload['env']['device']}, {payload['model']} model "
        f"({payload['model_parameters'] / 1e9:.2f}B params), rows of {payload['seq_len']} tokens, r={payload['lora_r']}, "
        f"gradient checkpointing, {payload['steps']} steps per batch size"
    )
    print(
        markdown_table(
            [
                "variant",
                "batch",
                "load peak (GiB)",
                "peak over load + train (GiB)",
                "footprint (GiB)",
                "step ms",
                "trainable params",
            ],
            rows,
        )
    )
    for b, r in payload.get("ratios", {}).items():
        if isinstance(r, dict):
            pm = r["peak_memory_ratio"]
            print(
                f"batch {b}: peak memory ratio QLoRA / LoRA-16 {'n/a (no CUDA)' if pm is None else f'{pm:.3f}'} "
                f"(goal <= 0.45); step time ratio {r['step_time_ratio']:.3f}"
            )
    if payload.get("skipped"):
        print("skipped:", "; ".join(payload["skipped"]))
    if not cuda:
        skip("peak GPU memory needs CUDA; the smoke run reports model footprints and CPU step times only")


# --------------------------------------------------------------------------------------------------- DDP
def ddp_benchmark(args, cuda: bool) -> dict | None:
    """QLoRA under DDP with transformers' Trainer: each rank loads its own 4-bit copy on its GPU."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    config = make_config(args.model, args.seq_len)
    training_args = TrainingArguments(
        output_dir="/tmp/hf_compress_qlora_ddp",
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_sizes[0],
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=cuda,
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and world > 1 else None,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        seed=rank,  # different seeds: only DDP keeps the adapters equal
    )
    state_dict = random_state_dict(config)  # same seed on every rank: the same base
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = load(config, state_dict, True, args.lora_r)
    del state_dict

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, *a, **k):
            sync()
            self._start = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            self.times.append(time.perf_counter() - self._start)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return args.batch_sizes[0] * world * (args.steps + 1)

        def __getitem__(self, i):
            ids = torch.randint(0, config.vocab_size, (args.seq_len,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    timer = Timer()
    trainer = Trainer(model=model, args=training_args, train_dataset=Rows(), callbacks=[timer])
    trainer.train()
    checksum = {n: p.detach().double().sum().item() for n, p in model.named_parameters() if p.requires_grad}
    local = {
        "rank": rank,
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "step_seconds": timer.times,
        "checksum": checksum,
        "device": str(next(p for p in model.parameters() if p.requires_grad).device),
    }
    ranks = [local]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ranks = [None] * world
        torch.distributed.all_gather_object(ranks, local)
    if rank != 0:
        return None
    identical = all(r["checksum"] == ranks[0]["checksum"] for r in ranks)
    trained = any(abs(v) > 0 for n, v in ranks[0]["checksum"].items() if "lora_B" in n)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    payload = {
        "benchmark": "qlora_ddp",
        "env": environment(),
        "world_size": world,
        "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
        "model": args.model,
        "batch_size_per_device": args.batch_sizes[0],
        "seq_len": args.seq_len,
        "steps": args.steps,
        "losses": losses,
        "adapters_identical_on_all_ranks": identical,
        "adapters_trained": trained,
        "ranks": [{k: v for k, v in r.items() if k != "checksum"} for r in ranks],
        "step_seconds_median": statistics.median(
            [max(r["step_seconds"][i] for r in ranks) for i in range(1, args.steps)] or [0.0]
        ),
    }
    gib = 2**30
    print(
        f"# QLoRA under DDP: {world} x {payload['env']['device']}, {args.model}, batch {args.batch_sizes[0]}x{args.seq_len}"
    )
    print(
        markdown_table(
            ["rank", "device", "peak GPU memory (GiB)", "step ms (median)"],
            [
                [
                    r["rank"],
                    r["device"],
                    None if r["peak_bytes"] is None else r["peak_bytes"] / gib,
                    statistics.median(r["step_seconds"][1:] or r["step_seconds"]) * 1e3,
                ]
                for r in ranks
            ],
        )
    )
    print(f"losses {[round(x, 4) for x in losses]}; adapters identical on all ranks: {identical}; trained: {trained}")
    write_json("qlora_ddp", payload, args.json)
    return payload


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, few steps")
    parser.add_argument("--model", default=None, choices=sorted(MODELS), help="default 7b (smoke with --smoke)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated, default 1,2,4 (1,2 with --smoke)")
    parser.add_argument("--batch-size", type=int, default=None, help="one batch size (same as --batch-sizes N)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 (32 with --smoke)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="training steps per batch size (default 3)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (0: none)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ddp", action="store_true", help="QLoRA under DDP with the Trainer (accelerate launch)")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting measurements past this")
    parser.add_argument("--estimate-load-s", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--estimate-step-s", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    cuda = has_cuda() and not args.smoke
    if not has_cuda() and not args.smoke:
        parser.error("no CUDA device: run with --smoke on CPU")
    args.model = args.model or ("smoke" if args.smoke else "7b")
    if args.batch_size is not None:
        args.batch_sizes = [args.batch_size]
    elif args.batch_sizes:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    else:
        args.batch_sizes = [1, 2] if args.smoke else [1, 2, 4]
    if any(b < 1 for b in args.batch_sizes):
        parser.error(f"--batch-sizes {args.batch_sizes}: every batch size must be >= 1")
    args.seq_len = args.seq_len or (32 if args.smoke else 2048)
    args.steps = args.steps or (2 if args.smoke else 3)
    if args.rounds is None:
        args.rounds = 3 if args.smoke else (10 if args.model == "0.7b" else 0)
    big = args.model == "7b"
    # Rough costs on an H200 (7B: ~15 s per load, ~0.6 s per step and row of 2048 tokens), for --budget-s.
    args.estimate_load_s = args.estimate_load_s or (15.0 if big else 5.0)
    args.estimate_step_s = args.estimate_step_s or (0.6 * args.seq_len / 2048 if big else 0.1)
    if args.ddp:
        ddp_benchmark(args, cuda)
        return
    payload = memory_benchmark(args, cuda, started)
    print_memory_table(payload, cuda)
    for path in write_json("qlora_memory", payload, args.json):
        print(f"wrote {path}")
    if os.environ.get("OUT"):
        print(json.dumps(payload.get("ratios", {})))


if __name__ == "__main__":
    main()
