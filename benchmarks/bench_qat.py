"""QAT vs PTQ on a small byte-level causal LM trained on WikiText-2, measured on this machine in one run.

Protocol (torchao's QAT comparison, scaled down to a CPU):
1. pre-train a small Llama (config only, byte-level vocabulary: no download) in full precision, with a cosine
   schedule annealed to zero, until the validation loss plateaus: the "base model". The validation curve is printed
   and a warning is raised when the last interval still improved by more than `--plateau-tol`. The base model is
   cached under `--cache-dir` (keyed by every pre-training setting), so later runs reuse it;
2. for each fine-tuning seed (window sampling and data order), from the base model, fine-tune for the same number
   of steps, same data, same learning rate and schedule, twice:
   a. in full precision -> perplexity `fp` (the reference); quantized afterwards with the same torchao config
      (PTQ, written and reloaded like the QAT model) -> `ptq`;
   b. with `QATCallback` (fake quantization from `--start-step`) -> the quantized model it saves, reloaded with
      plain `from_pretrained` -> `qat`;
3. recovery = (ptq - qat) / (ptq - fp): the share of the PTQ perplexity increase that QAT removes. Perplexities are
   per byte on a fixed slice of the WikiText-2 *test* split (validation is only used for the plateau check); a 95%
   interval from a paired bootstrap over evaluation windows is printed next to each recovery (it covers evaluation
   sampling only; the spread across seeds covers training);
4. step-time overhead of QAT: plain and fake-quantized training steps timed interleaved, median of repeats, plus the
   median Trainer step times of the fine-tuning runs.

Run from the repository root:

    python benchmarks/bench_qat.py            # ~9 min on 2 busy CPU cores the first time, ~5 min with the cache
    python benchmarks/bench_qat.py --quick    # smoke run (~1-2 minutes), figures not meaningful
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from hf_compress import QATCallback, QATConfig, prepare_qat_, save_qat_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"
LOADS: list[tuple[str, float]] = []


def note_load(phase: str) -> None:
    LOADS.append((phase, os.getloadavg()[0]))


class ByteWindows(torch.utils.data.Dataset):
    """Random windows of `seq_len` bytes of a text (byte-level tokens 0..255), fixed by `seed`."""

    def __init__(self, data: torch.Tensor, seq_len: int, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.data, self.seq_len = data, seq_len
        self.starts = torch.randint(0, len(data) - seq_len - 1, (n,), generator=g)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        ids = self.data[self.starts[i] : self.starts[i] + self.seq_len].long()
        return {"input_ids": ids, "labels": ids.clone()}


def load_bytes(name: str) -> torch.Tensor:
    return torch.frombuffer(bytearray((DATA / f"{name}.txt").read_bytes()), dtype=torch.uint8)


@torch.no_grad()
def window_losses(model, data: torch.Tensor, seq_len: int, n_windows: int, batch_size: int = 32) -> torch.Tensor:
    """Mean next-byte loss of each of the first `n_windows` non-overlapping windows of `data` (float64)."""
    model.eval()
    n_windows = min(n_windows, len(data) // seq_len)
    windows = data[: n_windows * seq_len].long().view(n_windows, seq_len)
    out = []
    for i in range(0, n_windows, batch_size):
        ids = windows[i : i + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        out.append(loss.view(ids.shape[0], -1).mean(1).double())
    return torch.cat(out)


def ppl(losses: torch.Tensor) -> float:
    return math.exp(float(losses.mean()))


def recovery_of(fp: torch.Tensor, ptq: torch.Tensor, qat: torch.Tensor) -> float:
    p_fp, p_ptq, p_qat = ppl(fp), ppl(ptq), ppl(qat)
    return (p_ptq - p_qat) / (p_ptq - p_fp) if p_ptq > p_fp else float("nan")


def bootstrap_recovery(fp, ptq, qat, n: int = 1000) -> tuple[float, float]:
    """2.5% and 97.5% quantiles of the recovery over windows resampled with replacement (paired across models)."""
    g = torch.Generator().manual_seed(0)
    values = []
    for _ in range(n):
        idx = torch.randint(0, len(fp), (len(fp),), generator=g)
        values.append(recovery_of(fp[idx], ptq[idx], qat[idx]))
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return float("nan"), float("nan")
    return values[int(0.025 * len(values))], values[min(len(values) - 1, int(0.975 * len(values)))]


def train_args(out: str, steps: int, lr: float, batch: int, seed: int, warmup: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=warmup,
        weight_decay=0.0,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, *args, **kwargs):
        self.t = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        self.times.append(time.perf_counter() - self.t)


class ValidationCurve(TrainerCallback):
    """Validation perplexity every `every` steps (the plateau check of pre-training)."""

    def __init__(self, valid: torch.Tensor, seq_len: int, n_windows: int, every: int):
        self.valid, self.seq_len, self.n_windows, self.every = valid, seq_len, n_windows, every
        self.curve: list[tuple[int, float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.curve.append((state.global_step, ppl(window_losses(model, self.valid, self.seq_len, self.n_windows))))
            model.train()


def pretrain(args, config: LlamaConfig, train: torch.Tensor, valid: torch.Tensor):
    """The base model and its validation curve, from `--cache-dir` when an identical pre-training is cached."""
    key_fields = {
        k: getattr(args, k)
        for k in (
            "hidden",
            "layers",
            "heads",
            "seq_len",
            "batch_size",
            "pretrain_steps",
            "pretrain_lr",
            "valid_windows",
        )
    }
    key = hashlib.sha1(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:12]
    cached = Path(args.cache_dir) / f"bench_qat_base_{key}"
    if (cached / "curve.json").is_file():
        print(f"pre-training: cached base model {cached}")
        return LlamaForCausalLM.from_pretrained(cached), json.loads((cached / "curve.json").read_text())["curve"]
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    data = ByteWindows(train, args.seq_len, args.pretrain_steps * args.batch_size, seed=1000)
    curve_cb = ValidationCurve(valid, args.seq_len, args.valid_windows, every=max(1, args.pretrain_steps // 10))
    with tempfile.TemporaryDirectory(prefix="bench_qat_pre_") as tmp:
        pre_args = train_args(
            tmp, args.pretrain_steps, args.pretrain_lr, args.batch_size, seed=0, warmup=args.pretrain_steps // 20
        )
        t0 = time.time()
        Trainer(model=base, args=pre_args, train_dataset=data, callbacks=[curve_cb]).train()
    print(f"pre-training: {args.pretrain_steps} steps in {time.time() - t0:.0f}s")
    cached.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(cached)
    (cached / "curve.json").write_text(json.dumps({"settings": key_fields, "curve": curve_cb.curve}))
    return base, curve_cb.curve


def time_steps(models: dict[str, torch.nn.Module], batch: dict, repeats: int) -> dict[str, float]:
    """Median seconds per training step (forward, backward, AdamW step), the models' steps interleaved."""
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(repeats + 2):
        for name, model in models.items():
            model.train()
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if r >= 2:  # warm-up
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def run_seed(args, seed, base, qat_config, train, test, tmp: Path) -> dict:
    """Fine-tune `base` with and without QAT for one seed; per-window test losses of fp / PTQ / QAT models."""
    ft_data = ByteWindows(train, args.seq_len, args.finetune_steps * args.batch_size, seed=seed)
    warmup = args.finetune_steps // 10

    fp_model, fp_timer = copy.deepcopy(base), StepTimer()
    fa = train_args(str(tmp / f"fp{seed}"), args.finetune_steps, args.finetune_lr, args.batch_size, seed, warmup)
    Trainer(model=fp_model, args=fa, train_dataset=ft_data, callbacks=[fp_timer]).train()
    note_load(f"seed {seed} fp fine-tune")
    fp = window_losses(fp_model, test, args.seq_len, args.eval_windows)
    ptq_model = save_qat_model(copy.deepcopy(fp_model), tmp / f"ptq{seed}", qat_config)
    ptq = window_losses(ptq_model, test, args.seq_len, args.eval_windows)

    qat_model, qat_timer = copy.deepcopy(base), StepTimer()
    qa = train_args(str(tmp / f"qat{seed}"), args.finetune_steps, args.finetune_lr, args.batch_size, seed, warmup)
    qat_cb = QATCallback(scheme=args.scheme, group_size=args.group_size, start_step=args.start_step)
    Trainer(model=qat_model, args=qa, train_dataset=ft_data, callbacks=[qat_cb, qat_timer]).train()
    note_load(f"seed {seed} QAT fine-tune")
    qat = window_losses(
        LlamaForCausalLM.from_pretrained(tmp / f"qat{seed}" / "quantized"), test, args.seq_len, args.eval_windows
    )
    qat_float = window_losses(qat_model, test, args.seq_len, args.eval_windows)  # fake quantization removed
    return {
        "fp": fp,
        "ptq": ptq,
        "qat": qat,
        "qat_float": qat_float,
        "fp_step": statistics.median(fp_timer.times[2:]),
        "qat_step": statistics.median(qat_timer.times[args.start_step + 2 :]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheme", default="int4-weight-only", help="QAT scheme (and the PTQ it is compared to).")
    parser.add_argument(
        "--group-size", type=int, default=128, help="weights per int4 scale (128 = hidden: one scale per row)"
    )
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pretrain-steps", type=int, default=2500)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3, help="peak; cosine to 0 with 5%% warm-up")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--finetune-lr", type=float, default=3e-4, help="peak; cosine to 0 with 10%% warm-up")
    parser.add_argument("--start-step", type=int, default=0, help="QAT: full-precision steps before fake quantization")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds")
    parser.add_argument("--eval-windows", type=int, default=2048, help="test windows of seq-len bytes (fixed slice)")
    parser.add_argument("--valid-windows", type=int, default=256, help="validation windows for the plateau check")
    parser.add_argument("--plateau-tol", type=float, default=0.01, help="max relative gain over the last interval")
    parser.add_argument("--timing-repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    parser.add_argument("--cache-dir", default="/tmp/hfc_bench_cache", help="where pre-trained base models are kept")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; figures are not meaningful")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.finetune_steps, args.seeds = 40, 20, [0]
        args.eval_windows, args.valid_windows, args.timing_repeats = 64, 32, 3
    if not DATA.is_dir():
        raise SystemExit(f"WikiText-2 not found at {DATA.resolve()}")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    note_load("start")

    train, valid, test = load_bytes("train"), load_bytes("valid"), load_bytes("test")
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
    )
    qat_config = QATConfig(scheme=args.scheme, group_size=args.group_size)
    print(
        f"machine: {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, load average {LOADS[0][1]:.1f}"
    )
    print(
        f"model: Llama byte-level, hidden {args.hidden}, {args.layers} layers, seq {args.seq_len}, batch "
        f"{args.batch_size}; scheme {args.scheme}, group size {args.group_size}; fine-tune {args.finetune_steps} "
        f"steps at lr {args.finetune_lr:g}, seeds {args.seeds}; test slice {args.eval_windows * args.seq_len} bytes"
    )

    # 1. converged base model
    base, curve = pretrain(args, config, train, valid)
    note_load("pre-training")
    print("validation perplexity during pre-training: " + ", ".join(f"{s}: {p:.4f}" for s, p in curve))
    if len(curve) >= 2:
        gain = (curve[-2][1] - curve[-1][1]) / curve[-2][1]
        status = "plateau" if gain <= args.plateau_tol else "WARNING: still improving, not a plateau"
        print(f"last interval: {100 * gain:+.2f}% ({status}; tolerance {100 * args.plateau_tol:.1f}%)")
    base_test = window_losses(base, test, args.seq_len, args.eval_windows)
    with tempfile.TemporaryDirectory(prefix="bench_qat_") as tmp:
        tmp = Path(tmp)
        base_ptq = window_losses(
            save_qat_model(copy.deepcopy(base), tmp / "base_ptq", qat_config), test, args.seq_len, args.eval_windows
        )
        # 2. per seed: fp fine-tune (+ PTQ) and QAT fine-tune, same steps, data, schedule
        results = {seed: run_seed(args, seed, base, qat_config, train, test, tmp) for seed in args.seeds}

    # 4. interleaved step timing, plain vs fake-quantized copies of the base model
    plain, fake = copy.deepcopy(base), copy.deepcopy(base)
    prepare_qat_(fake, qat_config)
    batch_data = ByteWindows(train, args.seq_len, args.batch_size, seed=99)
    batch = {k: torch.stack([batch_data[i][k] for i in range(args.batch_size)]) for k in ("input_ids", "labels")}
    medians = time_steps({"plain": plain, "qat": fake}, batch, args.timing_repeats)
    note_load("timing")

    print()
    print(f"test perplexity per byte (first {args.eval_windows} windows of {args.seq_len} bytes of test.txt)")
    print(
        f"base model: {ppl(base_test):.4f}; base + PTQ: {ppl(base_ptq):.4f} "
        f"({100 * (ppl(base_ptq) / ppl(base_test) - 1):+.2f}%)"
    )
    header = f"{'seed':>4}  {'fp':>8}  {'PTQ':>8}  {'QAT':>8}  {'QAT float':>9}  {'PTQ degr.':>9}  {'QAT degr.':>9}"
    print(header + f"  {'recovery':>8}  {'95% CI (eval windows)':>22}")
    recoveries = []
    for seed, r in results.items():
        p_fp, p_ptq, p_qat, p_qf = ppl(r["fp"]), ppl(r["ptq"]), ppl(r["qat"]), ppl(r["qat_float"])
        rec = recovery_of(r["fp"], r["ptq"], r["qat"])
        lo, hi = bootstrap_recovery(r["fp"], r["ptq"], r["qat"])
        recoveries.append(rec)
        print(
            f"{seed:>4}  {p_fp:>8.4f}  {p_ptq:>8.4f}  {p_qat:>8.4f}  {p_qf:>9.4f}  {100 * (p_ptq / p_fp - 1):>+8.2f}%  "
            f"{100 * (p_qat / p_fp - 1):>+8.2f}%  {100 * rec:>7.1f}%  {f'[{100 * lo:.1f}%, {100 * hi:.1f}%]':>22}"
        )
    if len(recoveries) > 1:
        print(
            f"recovery over seeds: mean {100 * statistics.mean(recoveries):.1f}%, min {100 * min(recoveries):.1f}%, "
            f"max {100 * max(recoveries):.1f}% (goal >= 68%)"
        )
    overhead = medians["qat"] / medians["plain"]
    trainer_overhead = statistics.median(r["qat_step"] for r in results.values()) / statistics.median(
        r["fp_step"] for r in results.values()
    )
    print(
        f"QAT step time / plain step time: {overhead:.2f}x interleaved (median of {args.timing_repeats}: "
        f"{1000 * medians['qat']:.1f} ms vs {1000 * medians['plain']:.1f} ms), {trainer_overhead:.2f}x from the "
        f"Trainer fine-tuning runs (goal <= 1.5x)"
    )
    print("load average (1 min) by phase: " + ", ".join(f"{p} {v:.1f}" for p, v in LOADS))
    print(f"total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
