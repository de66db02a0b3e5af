"""Pruning benchmark, measured in one run on this machine.

(a) Overhead: Trainer step time with `PruningCallback` (masks held, re-applied after every optimizer step) against
    the same Trainer without it, on the same model and batches, outside pruning steps. Rounds are interleaved
    (A, B, A, B, ...) and medians reported, because the machine may be shared.
(b) Quality: a small byte-level GPT-2 trained from scratch on WikiText-2 (../shared/data/wikitext2), then pruned to
    50% unstructured and 2:4 with magnitude and with Wanda; byte-level perplexity on the validation split
    before pruning, right after one-shot pruning, and after a short fine-tune with the callback (a dense model
    fine-tuned for the same steps is the reference).

    python benchmarks/bench_pruning.py                # defaults: about 6-8 minutes on 2 CPU cores
    python benchmarks/bench_pruning.py --quick        # a one-minute smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from hf_compress import PruningCallback, PruningConfig, prune_, sparsity_report
from hf_compress.metrics import compute_perplexity

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


class ByteBlocks(torch.utils.data.Dataset):
    """Fixed-length blocks of raw UTF-8 bytes (vocabulary 256: a tokenizer that needs no training or download)."""

    def __init__(self, path: Path, block: int, max_blocks: int | None = None):
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
        n = data.numel() // block
        if max_blocks:
            n = min(n, max_blocks)
        self.blocks = data[: n * block].view(n, block)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": ids.clone()}


def batches(dataset, batch_size, limit):
    out = []
    for start in range(0, min(len(dataset), limit * batch_size), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        out.append({"input_ids": torch.stack([r["input_ids"] for r in rows])})
    return out


def make_args(out_dir, steps, lr, batch_size, seed=0):
    return TrainingArguments(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        warmup_steps=min(50, steps // 10),
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer, and every callback's step hooks)."""

    def __init__(self):
        self.times, self._t0 = [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t0)


def bench_overhead(opts, out_dir):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_positions=opts.block, n_embd=opts.overhead_hidden, n_layer=4, n_head=4)
    base = GPT2LMHeadModel(cfg)
    data = ByteBlocks(DATA / "train.txt", opts.block, max_blocks=opts.batch_size * opts.overhead_steps)
    models = {"without": copy.deepcopy(base), "with": copy.deepcopy(base)}
    # Prune once up front: the timed steps are all "outside pruning steps" (masks only re-applied).
    pruning = PruningCallback(PruningConfig(sparsity=0.5, schedule="oneshot", start_step=0))
    times = {"without": [], "with": []}
    for round_ in range(opts.rounds):
        for name in ["without", "with"] if round_ % 2 == 0 else ["with", "without"]:
            timer = StepTimer()
            callbacks = [pruning, timer] if name == "with" else [timer]
            args = make_args(os.path.join(out_dir, name), opts.overhead_steps, 1e-4, opts.batch_size)
            Trainer(model=models[name], args=args, train_dataset=data, callbacks=callbacks).train()
            times[name].extend(timer.times[2:])  # drop warm-up steps of each round
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = med["with"] / med["without"] - 1
    print(
        f"\n(a) step-time overhead, GPT-2 4x{opts.overhead_hidden} ({sum(p.numel() for p in base.parameters()) / 1e6:.2f}M "
        f"params), batch {opts.batch_size}x{opts.block}, {opts.rounds} interleaved rounds x {opts.overhead_steps} steps"
    )
    print(f"    median step without callback: {med['without'] * 1e3:.1f} ms  (n={len(times['without'])})")
    print(f"    median step with callback:    {med['with'] * 1e3:.1f} ms  (n={len(times['with'])})")
    print(
        f"    overhead: {overhead * 100:+.2f}%   sparsity of the pruned run: "
        f"{sparsity_report(models['with'])['target_sparsity']:.3f}"
    )
    # The callback's own per-step work, timed alone (it is what differs between the two runs).
    reps = 200
    t0 = time.perf_counter()
    for _ in range(reps):
        pruning.on_optimizer_step(None, None, None)
    own = (time.perf_counter() - t0) / reps
    print(f"    callback on_optimizer_step alone: {own * 1e3:.3f} ms = {own / med['without'] * 100:.2f}% of a step")
    return {
        "without_ms": med["without"] * 1e3,
        "with_ms": med["with"] * 1e3,
        "overhead": overhead,
        "own_ms": own * 1e3,
    }


def bench_quality(opts, out_dir):
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=256,
        n_positions=opts.block,
        n_embd=opts.hidden,
        n_layer=opts.layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg)
    train = ByteBlocks(DATA / "train.txt", opts.block)
    valid = batches(ByteBlocks(DATA / "valid.txt", opts.block), 16, opts.eval_batches)
    calibration = batches(train, opts.batch_size, 8)
    t0 = time.perf_counter()
    Trainer(
        model=model,
        args=make_args(os.path.join(out_dir, "base"), opts.train_steps, opts.lr, opts.batch_size),
        train_dataset=train,
    ).train()
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        dense_ppl = compute_perplexity(model, valid)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"\n(b) quality: byte-level GPT-2 {opts.layers}x{opts.hidden} ({n_params / 1e6:.2f}M params), trained "
        f"{opts.train_steps} steps x {opts.batch_size}x{opts.block} bytes on WikiText-2 train in {train_s:.0f} s"
    )
    print(f"    validation: {opts.eval_batches} batches x 16 x {opts.block} bytes; perplexity is per byte")

    def finetune(m, callbacks, tag):
        # Fine-tune on other data than the base run saw last: a later slice of the train split.
        args = make_args(os.path.join(out_dir, tag), opts.finetune_steps, opts.finetune_lr, opts.batch_size, seed=1)
        Trainer(model=m, args=args, train_dataset=train, callbacks=callbacks).train()
        with torch.no_grad():
            return compute_perplexity(m, valid)

    dense_ft = finetune(copy.deepcopy(model), [], "dense")
    rows = [("dense", "-", dense_ppl, dense_ppl, dense_ft, 0.0)]
    for pattern in ("unstructured", "2:4"):
        for method in ("magnitude", "wanda"):
            config = PruningConfig(
                method=method,
                sparsity=0.5 if pattern == "unstructured" else None,
                pattern=pattern,
                schedule="oneshot",
                start_step=0,
            )
            oneshot = copy.deepcopy(model)
            prune_(oneshot, config, calibration_data=calibration)
            with torch.no_grad():
                after = compute_perplexity(oneshot, valid)
            tuned = copy.deepcopy(model)
            ft = finetune(tuned, [PruningCallback(config, calibration_data=calibration)], f"{method}-{pattern}")
            report = sparsity_report(tuned, pattern=pattern if pattern != "unstructured" else None)
            assert pattern == "unstructured" or report["n_m_compliant"]
            rows.append((method, pattern, dense_ppl, after, ft, report["target_sparsity"]))
    print(f"    fine-tune: {opts.finetune_steps} steps, lr {opts.finetune_lr}, callback keeps the masks")
    print(f"    {'method':<10} {'pattern':<13} {'sparsity':>8} {'ppl dense':>10} {'ppl pruned':>11} {'ppl +ft':>8}")
    for method, pattern, before, after, ft, sp in rows:
        print(f"    {method:<10} {pattern:<13} {sp:>8.3f} {before:>10.3f} {after:>11.3f} {ft:>8.3f}")
    return [dict(zip(["method", "pattern", "ppl_dense", "ppl_pruned", "ppl_finetuned", "sparsity"], r)) for r in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--eval-batches", type=int, default=40)
    parser.add_argument("--overhead-hidden", type=int, default=256)
    parser.add_argument("--overhead-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    parser.add_argument("--json", type=str, default=None, help="also write the figures to this file")
    opts = parser.parse_args()
    if opts.quick:
        opts.train_steps, opts.finetune_steps, opts.eval_batches, opts.rounds, opts.overhead_steps = 60, 10, 4, 2, 6
    if not DATA.is_dir():
        raise SystemExit(f"WikiText-2 not found at {DATA}")
    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    results = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if not opts.skip_overhead:
            results["overhead"] = bench_overhead(opts, tmp)
        if not opts.skip_quality:
            results["quality"] = bench_quality(opts, tmp)
    print(f"\ntotal {time.perf_counter() - start:.0f} s, load average at the end {os.getloadavg()}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
