"""QAT vs PTQ on a small byte-level causal LM trained on WikiText-2, measured on this machine in one run.

Protocol (torchao's QAT comparison, scaled down to a CPU):
1. pre-train a small Llama (config only, byte-level vocabulary: no download) in full precision: the "base model";
2. from the base model, fine-tune for the same number of steps, same data order, twice:
   a. in full precision -> perplexity `fp`; quantized afterwards (PTQ, same torchao int4 config) -> `ptq`;
   b. with `QATCallback` (fake quantization from `--start-step`, default 0) -> the quantized model it saves -> `qat`;
3. recovery = (ptq - qat) / (ptq - fp): the share of the PTQ perplexity increase that QAT removes;
4. step-time overhead of QAT: plain and fake-quantized training steps timed interleaved, median of repeats.

Perplexities are per byte on WikiText-2 validation text. Run from the repository root:

    python benchmarks/bench_qat.py                 # ~5-8 minutes on 2 CPU cores
    python benchmarks/bench_qat.py --quick         # smoke run (~1 minute), figures not meaningful
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from hf_compress import QATCallback, QATConfig, prepare_qat_, save_qat_model

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext2"


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


def load_bytes(name: str, limit: int | None = None) -> torch.Tensor:
    raw = (DATA / f"{name}.txt").read_bytes()
    raw = raw[:limit] if limit else raw
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


@torch.no_grad()
def perplexity(model, data: torch.Tensor, seq_len: int, n_windows: int, batch_size: int = 16) -> float:
    """Per-byte perplexity over the first `n_windows` non-overlapping windows of `data`."""
    model.eval()
    windows = data[: n_windows * seq_len].long().view(n_windows, seq_len)
    total, count = 0.0, 0
    for i in range(0, n_windows, batch_size):
        ids = windows[i : i + batch_size]
        loss = model(input_ids=ids, labels=ids).loss
        n = ids.numel() - ids.shape[0]  # predicted positions
        total += float(loss) * n
        count += n
    return math.exp(total / count)


def train_args(out: str, steps: int, lr: float, batch: int, warmup: int = 0, scheduler: str = "constant") -> dict:
    return dict(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type=scheduler if not warmup else "cosine",
        warmup_steps=warmup,
        weight_decay=0.0,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=max(1, steps // 5),
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def time_steps(models: dict[str, torch.nn.Module], batch: dict, repeats: int) -> dict[str, float]:
    """Median seconds per training step (forward, backward, AdamW step), the models' steps interleaved."""
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheme", default="int4-weight-only", help="QAT scheme (and the PTQ it is compared to).")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--start-step", type=int, default=0, help="QAT: full-precision steps before fake quantization")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--timing-repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; figures are not meaningful")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.finetune_steps, args.eval_windows, args.timing_repeats = 20, 10, 16, 3
    if not DATA.is_dir():
        raise SystemExit(f"WikiText-2 not found at {DATA.resolve()}")
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.time()

    train, valid = load_bytes("train"), load_bytes("valid")
    n_pre = args.pretrain_steps * args.batch_size
    n_ft = args.finetune_steps * args.batch_size
    pre_data = ByteWindows(train, args.seq_len, n_pre, seed=1)
    ft_data = ByteWindows(train, args.seq_len, n_ft, seed=2)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
    )
    qat_config = QATConfig(scheme=args.scheme, group_size=args.group_size)
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, load average {load:.1f}")
    print(
        f"model: Llama byte-level, hidden {args.hidden}, {args.layers} layers, seq {args.seq_len}, batch "
        f"{args.batch_size}; scheme {args.scheme}, group size {args.group_size}"
    )

    with tempfile.TemporaryDirectory(prefix="bench_qat_") as tmp:
        tmp = Path(tmp)
        # 1. base model
        torch.manual_seed(0)
        base = LlamaForCausalLM(config)
        warmup = max(1, args.pretrain_steps // 10)
        pre_args = TrainingArguments(
            **train_args(str(tmp / "pre"), args.pretrain_steps, args.pretrain_lr, args.batch_size, warmup=warmup)
        )
        t0 = time.time()
        Trainer(model=base, args=pre_args, train_dataset=pre_data).train()
        ppl_base = perplexity(base, valid, args.seq_len, args.eval_windows)
        print(f"pre-training: {args.pretrain_steps} steps in {time.time() - t0:.0f}s, base perplexity {ppl_base:.3f}")

        # 2a. full-precision fine-tune, then PTQ
        fp_model = copy.deepcopy(base)
        step_times: dict[str, list[float]] = {"plain": [], "qat": []}

        def timer(key):
            from transformers import TrainerCallback

            class _Timer(TrainerCallback):
                def on_step_begin(self, *a, **k):
                    self.t = time.perf_counter()

                def on_step_end(self, *a, **k):
                    step_times[key].append(time.perf_counter() - self.t)

            return _Timer()

        ft = train_args(str(tmp / "fp"), args.finetune_steps, args.finetune_lr, args.batch_size)
        Trainer(
            model=fp_model, args=TrainingArguments(**ft), train_dataset=ft_data, callbacks=[timer("plain")]
        ).train()
        ppl_fp = perplexity(fp_model, valid, args.seq_len, args.eval_windows)
        ptq_model = save_qat_model(copy.deepcopy(fp_model), tmp / "ptq", qat_config)  # PTQ: same torchao config
        ppl_ptq = perplexity(ptq_model, valid, args.seq_len, args.eval_windows)

        # 2b. QAT fine-tune from the same base, same steps and data order; evaluate the saved quantized model
        qat_model = copy.deepcopy(base)
        ft = train_args(str(tmp / "qat"), args.finetune_steps, args.finetune_lr, args.batch_size)
        qat_cb = QATCallback(scheme=args.scheme, group_size=args.group_size, start_step=args.start_step)
        Trainer(
            model=qat_model, args=TrainingArguments(**ft), train_dataset=ft_data, callbacks=[qat_cb, timer("qat")]
        ).train()
        qat_quantized = LlamaForCausalLM.from_pretrained(tmp / "qat" / "quantized")
        ppl_qat = perplexity(qat_quantized, valid, args.seq_len, args.eval_windows)
        ppl_qat_float = perplexity(qat_model, valid, args.seq_len, args.eval_windows)

    # 4. interleaved step timing, plain vs fake-quantized copies of the base model
    plain, fake = copy.deepcopy(base), copy.deepcopy(base)
    prepare_qat_(fake, qat_config)
    batch = {k: torch.stack([ft_data[i][k] for i in range(args.batch_size)]) for k in ("input_ids", "labels")}
    medians = time_steps({"plain": plain, "qat": fake}, batch, args.timing_repeats)

    degradation = ppl_ptq - ppl_fp
    recovery = (ppl_ptq - ppl_qat) / degradation if degradation > 0 else float("nan")
    overhead = medians["qat"] / medians["plain"]
    trainer_overhead = statistics.median(step_times["qat"][args.start_step + 2 :]) / statistics.median(
        step_times["plain"][2:]
    )
    print()
    print(f"{'model':<44}{'perplexity (per byte)':>22}")
    print(f"{'base (pre-trained)':<44}{ppl_base:>22.4f}")
    print(f"{'full precision fine-tune':<44}{ppl_fp:>22.4f}")
    print(f"{'  + PTQ ' + args.scheme:<44}{ppl_ptq:>22.4f}")
    print(f"{'QAT fine-tune, quantized (saved, reloaded)':<44}{ppl_qat:>22.4f}")
    print(f"{'QAT fine-tune, float weights (not quantized)':<44}{ppl_qat_float:>22.4f}")
    print()
    print(f"PTQ perplexity increase: {degradation:+.4f} ({100 * degradation / ppl_fp:+.2f}%)")
    print(f"QAT perplexity increase: {ppl_qat - ppl_fp:+.4f}")
    print(f"share of the PTQ degradation recovered by QAT: {100 * recovery:.1f}% (goal >= 68%)")
    print(
        f"QAT step time / plain step time: {overhead:.2f}x interleaved (median of {args.timing_repeats}: "
        f"{1000 * medians['qat']:.1f} ms vs {1000 * medians['plain']:.1f} ms), {trainer_overhead:.2f}x from the two "
        f"Trainer runs (goal <= 1.5x)"
    )
    print(f"total {time.time() - t_start:.0f}s; load average now {os.getloadavg()[0]:.1f} (started at {load:.1f})")


if __name__ == "__main__":
    main()
