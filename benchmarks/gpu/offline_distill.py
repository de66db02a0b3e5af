"""Offline distillation on a GPU: SmolLM2-135M -> a 15-layer student on WikiText-2, from cached teacher targets.

Most important figures first (each written to JSON as soon as it is measured):
  1. caching (`cache_teacher_logits`): bytes per token on disk and cache time, `sampled` (--num-samples draws) and
     `topk` (--top-k);
  2. step time and peak GPU memory on the same student, teacher and batches: cross-entropy, cached `sampled`, cached
     `topk`, online `DistillationTrainer`, TRL 1.16 `GKDTrainer` off-policy (lmbda=0, seq_kd=False, beta=0: forward
     KL) -- medians over steps of two interleaved rounds (goal: cached at least 2x faster than TRL);
  3. one epoch over the same tokens in the same order: cached `sampled`, online, cross-entropy, cached `topk`: wall
     time (goal: cached <= 1.10x cross-entropy) and WikiText-2 validation perplexity on 512-token windows (goal:
     `sampled` within 2% of online).

The training-token budget is derived from step times measured first, so that the whole run fits --budget-s.

    python benchmarks/gpu/offline_distill.py --budget-s 290        # GPU (bf16 autocast, fused AdamW, 16 x 512)
    python benchmarks/gpu/offline_distill.py --smoke               # CPU, tiny teacher, same code path

Writes $OUT/offline_distill.json (OUT defaults to benchmarks/gpu/results) after every measurement and prints
Markdown tables at the end.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, sync  # noqa: E402

from hf_compress import (  # noqa: E402
    DistillationConfig,
    DistillationTrainer,
    cache_teacher_logits,
    compute_perplexity,
    create_student,
    smollm2_folder,
)

NAME = "offline_distill"
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------- data
def default_data_dir() -> str:
    shared = REPO.parent / "shared" / "data" / "wikitext2"
    return str(shared if shared.is_dir() else REPO / ".gpudata" / "wikitext2")


def tokenize_blocks(
    path: Path, tokenizer, seq_len: int, max_tokens: int | None, vocab: int | None = None
) -> list[list[int]]:
    """Consecutive `seq_len`-token blocks of a WikiText-2 file (line by line, remainder dropped); ids modulo
    `vocab` when given (the smoke run's tiny vocabulary)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    ids: list[int] = []
    for start in range(0, len(lines), 4000):
        for row in tokenizer(lines[start : start + 4000], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if vocab is not None:
        ids = [i % vocab for i in ids]
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def lm_dataset(blocks: list[list[int]]):
    import datasets

    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks], "labels": blocks}
    )


# ------------------------------------------------------------------------------------------------------ training
class StepTimer(TrainerCallback):
    """Times each optimizer step (synchronized), apart from data loading."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.times.append(time.perf_counter() - self._start)


def peak_reset(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.device = args.device
        self.cuda = self.device == "cuda"
        self.payload: dict = {
            "benchmark": NAME,
            "smoke": args.smoke,
            "env": environment(),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "cache": {},
            "steps": {},
            "epochs": {},
            "perplexity": {},
            "skipped": [],
        }
        self.tmp = Path(tempfile.mkdtemp(prefix="hf_compress_offline_distill_"))

    # -- bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return self.args.budget_s - self.elapsed()

    def save(self) -> None:
        self.payload["elapsed_s"] = round(self.elapsed(), 1)
        from common import write_json

        write_json(NAME, self.payload, self.args.json)

    def fits(self, what: str, estimate_s: float) -> bool:
        if estimate_s <= self.remaining() - self.args.margin_s:
            return True
        self.payload["skipped"].append(f"{what}: needs ~{estimate_s:.0f} s, {self.remaining():.0f} s left")
        print(f"SKIPPED: {what} (needs ~{estimate_s:.0f} s, {self.remaining():.0f} s of budget left)", flush=True)
        self.save()
        return False

    # -- models
    def load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        args = self.args
        folder = smollm2_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.vocab_limit = None
        if args.smoke:  # a tiny Llama on SmolLM2's tokens (ids modulo 512, to keep CPU logits small)
            torch.manual_seed(0)
            self.vocab_limit = 512
            config = LlamaConfig(
                vocab_size=self.vocab_limit,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                tie_word_embeddings=True,
                bos_token_id=self.tokenizer.bos_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            teacher32 = LlamaForCausalLM(config)
        else:
            teacher32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        teacher32.config.use_cache = False
        self.student_cpu = create_student(teacher32, num_layers=args.student_layers)
        self.student_cpu.config.use_cache = False
        self.teacher = teacher32.to(torch.bfloat16 if self.cuda else torch.float32).to(self.device).eval()
        del teacher32
        data = Path(args.data_dir)
        max_tokens = args.max_train_tokens or None
        self.train_blocks = tokenize_blocks(
            data / "train.txt", self.tokenizer, args.seq_len, max_tokens, self.vocab_limit
        )
        eval_tokens = args.eval_windows * args.seq_len if args.eval_windows else None
        self.eval_blocks = tokenize_blocks(
            data / f"{args.eval_split}.txt", self.tokenizer, args.seq_len, eval_tokens, self.vocab_limit
        )
        self.payload["data"] = {
            "train_blocks_available": len(self.train_blocks),
            "eval_split": args.eval_split,
            "eval_windows": len(self.eval_blocks),
            "seq_len": args.seq_len,
            "teacher_parameters": sum(p.numel() for p in self.teacher.parameters()),
            "student_parameters": sum(p.numel() for p in self.student_cpu.parameters()),
            "student_layers": args.student_layers,
        }
        self.save()

    def student(self):
        return copy.deepcopy(self.student_cpu).to(self.device)

    def teacher_on(self, on: bool) -> None:
        """The teacher stays off the GPU in runs that do not use it, so their peak memory is their own."""
        if self.cuda:
            self.teacher.to(self.device if on else "cpu")

    def training_args(self, cls, name: str, max_steps: int | None, constant: bool, **extra):
        a = self.args
        kw = dict(
            output_dir=str(self.tmp / name),
            per_device_train_batch_size=a.batch_size,
            learning_rate=a.learning_rate,
            lr_scheduler_type="constant" if constant else "cosine",
            warmup_steps=0 if constant else a.warmup_steps,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch_fused" if self.cuda else "adamw_torch",
            bf16=self.cuda,
            use_cpu=not self.cuda,
            logging_steps=max(10, (max_steps or 1000) // 4),
            report_to="none",
            save_strategy="no",
            seed=0,
            data_seed=0,
            disable_tqdm=True,
            dataloader_num_workers=a.workers,
            dataloader_pin_memory=self.cuda,
        )
        if max_steps is not None:
            kw["max_steps"] = max_steps
        else:
            kw["num_train_epochs"] = 1
        kw.update(extra)
        return cls(**kw)

    def run(self, variant: str, max_steps: int | None, constant: bool) -> dict:
        """One training run of `variant` (ce, sampled, topk, online, trl); returns timings, memory and the model."""
        from transformers import Trainer, TrainingArguments, default_data_collator

        a = self.args
        distill = dict(temperature=a.temperature, alpha=a.alpha, loss_type="forward_kl")
        self.teacher_on(variant in ("online", "trl"))
        peak_reset(self.device)
        model = self.student()
        timer = StepTimer()
        if variant == "ce":
            trainer = Trainer(
                model=model,
                args=self.training_args(TrainingArguments, variant, max_steps, constant),
                train_dataset=self.train,
                data_collator=default_data_collator,
                callbacks=[timer],
            )
        elif variant in ("sampled", "topk"):
            trainer = DistillationTrainer(
                model=model,
                teacher_model=None,
                args=self.training_args(DistillationConfig, variant, max_steps, constant, **distill),
                train_dataset=self.caches[variant].dataset,
                data_collator=default_data_collator,
                callbacks=[timer],
            )
        elif variant == "online":
            trainer = DistillationTrainer(
                model=model,
                teacher_model=self.teacher,
                args=self.training_args(DistillationConfig, variant, max_steps, constant, **distill),
                train_dataset=self.train,
                data_collator=default_data_collator,
                callbacks=[timer],
            )
        elif variant == "trl":
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            trainer = GKDTrainer(
                model=model,
                teacher_model=self.teacher,
                args=self.training_args(
                    GKDConfig,
                    variant,
                    max_steps,
                    constant,
                    lmbda=0.0,
                    beta=0.0,
                    seq_kd=False,
                    temperature=a.temperature,
                    max_length=a.seq_len,
                    gradient_checkpointing=False,  # TRL's default is True; off, as in the other runs
                ),
                train_dataset=self.train,
                processing_class=self.tokenizer,
                data_collator=default_data_collator,
                callbacks=[timer],
            )
        else:
            raise ValueError(variant)
        sync()
        start = time.perf_counter()
        output = trainer.train()
        sync()
        wall = time.perf_counter() - start
        steady = timer.times[a.timing_warmup :] or timer.times
        result = {
            "steps": len(timer.times),
            "tokens": len(timer.times) * a.batch_size * a.seq_len,
            "wall_s": round(wall, 3),
            "train_runtime_s": round(output.metrics.get("train_runtime", wall), 3),
            "step_times_s": [round(t, 5) for t in timer.times],
            "median_step_ms": round(1000 * statistics.median(steady), 3),
            "peak_mib": peak_mib(self.device),
            "train_loss": output.training_loss,
        }
        logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
        for key in ("loss_distill", "loss_task"):
            if key in logs:
                result[f"last_{key}"] = logs[key]
        del trainer
        return result, model

    # -- perplexity
    @torch.no_grad()
    def perplexity(self, model) -> float:
        batches = [
            {"input_ids": torch.tensor(self.eval_blocks[i : i + self.args.eval_batch_size])}
            for i in range(0, len(self.eval_blocks), self.args.eval_batch_size)
        ]
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.cuda):
            return compute_perplexity(model, batches)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny teacher with SmolLM2's tokenizer")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 290; smoke 240)")
    parser.add_argument("--margin-s", type=float, default=None, help="kept free at the end (default 15; smoke 2)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available; smoke: cpu)")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--seq-len", type=int, default=None, help="default 512 (smoke 32)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (smoke 4)")
    parser.add_argument("--student-layers", type=int, default=None, help="default 15 of 30 (smoke 2 of 4)")
    parser.add_argument(
        "--train-tokens", type=int, default=None, help="tokens per epoch; 0 = derived from the budget (smoke 512)"
    )
    parser.add_argument("--max-train-tokens", type=int, default=None, help="tokenize at most this (smoke 2048)")
    parser.add_argument("--eval-split", default="valid", choices=["valid", "test"])
    parser.add_argument("--eval-windows", type=int, default=None, help="512-token windows; 0 = all (smoke 4)")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default 10 (smoke 0)")
    parser.add_argument("--timing-steps", type=int, default=None, help="steps per timing round (default 12; smoke 3)")
    parser.add_argument("--timing-warmup", type=int, default=None, help="untimed steps per run (default 3; smoke 1)")
    parser.add_argument("--cache-batch-size", type=int, default=None, help="default 32 (smoke 4)")
    parser.add_argument("--workers", type=int, default=None, help="dataloader workers (default 2; smoke 0)")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    smoke = args.smoke
    defaults = dict(
        budget_s=(240, 290),
        margin_s=(2, 15),
        seq_len=(32, 512),
        batch_size=(4, 16),
        student_layers=(2, 15),
        max_train_tokens=(2048, None),
        eval_windows=(4, 0),
        warmup_steps=(0, 10),
        train_tokens=(512, 0),
        timing_steps=(3, 12),
        timing_warmup=(1, 3),
        cache_batch_size=(4, 32),
        workers=(0, 2),
    )
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if smoke else full)
    if args.device is None:
        args.device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device (run with --smoke on CPU)")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    bench = Bench(args)
    try:
        measure(bench)
    finally:
        bench.save()
        shutil.rmtree(bench.tmp, ignore_errors=True)
    report(bench.payload)


def measure(bench: Bench) -> None:
    args, payload = bench.args, bench.payload
    bench.load()
    print(f"[{bench.elapsed():.0f}s] loaded: {payload['data']}", flush=True)

    # ---- probe: step times of cross-entropy and online distillation decide how many tokens fit the budget
    bench.train = lm_dataset(bench.train_blocks[: args.batch_size * (args.timing_steps + args.timing_warmup)])
    probe = {}
    for variant in ("ce", "online"):
        probe[variant], model = bench.run(variant, args.timing_steps + args.timing_warmup, constant=True)
        del model
    t_ce, t_on = probe["ce"]["median_step_ms"] / 1000, probe["online"]["median_step_ms"] / 1000
    payload["probe"] = {k: {kk: v[kk] for kk in ("median_step_ms", "peak_mib")} for k, v in probe.items()}
    available = len(bench.train_blocks)
    if args.train_tokens:
        blocks = min(available, args.train_tokens // args.seq_len)
    else:
        # per optimizer step of the epoch phase: ce + 2 cached (~1.1 ce) + online; caching: a teacher forward and
        # target extraction per batch and method; fixed: the timing rounds (10 runs), 6 perplexity evaluations
        per_step = t_ce * 3.3 + t_on * 1.05 + 2 * (1.5 * max(t_on - t_ce, 0.2 * t_ce) + 0.01)
        fixed = 10 * (args.timing_steps + args.timing_warmup) * t_on * 1.5 + 10 * 3.0 + 6 * 2.0 + 20
        steps = max(1, int((bench.remaining() - args.margin_s - fixed) / per_step))
        blocks = min(available, steps * args.batch_size)
    blocks = max(args.batch_size, blocks - blocks % args.batch_size)
    bench.train_blocks = bench.train_blocks[:blocks]
    bench.train = lm_dataset(bench.train_blocks)
    payload["train_tokens"] = blocks * args.seq_len
    payload["train_steps_per_epoch"] = blocks // args.batch_size
    payload["full_epoch"] = blocks >= available - args.batch_size
    bench.save()
    print(f"[{bench.elapsed():.0f}s] probe {payload['probe']}; epoch = {blocks} blocks", flush=True)

    # ---- 1. caching: bytes per token and time
    bench.caches = {}
    bench.teacher_on(True)
    for method in ("sampled", "topk"):
        estimate = payload["train_steps_per_epoch"] * (1.5 * max(t_on - t_ce, 0.2 * t_ce) + 0.01) + 5
        if not bench.fits(f"cache {method}", estimate):
            continue
        sync()
        start = time.perf_counter()
        result = cache_teacher_logits(
            bench.teacher,
            bench.train,
            bench.tmp / f"cache_{method}",
            method=method,
            **({"top_k": args.top_k} if method == "topk" else {"num_samples": args.num_samples}),
            temperature=args.temperature,
            batch_size=args.cache_batch_size,
            device=args.device,
            progress=False,
        )
        sync()
        seconds = time.perf_counter() - start
        bench.caches[method] = result
        payload["cache"][method] = {
            "k": result.spec.k,
            "tokens": result.num_positions,
            "bytes_per_token": round(result.bytes_per_token, 2),
            "target_mb": round(result.target_bytes / 2**20, 1),
            "disk_mb_with_inputs": round(result.disk_bytes / 2**20, 1),
            "cache_s": round(seconds, 2),
            "teacher_pass_s": round(result.teacher_seconds, 2),
            "tokens_per_s": round(result.num_positions / seconds),
        }
        bench.save()
        print(f"[{bench.elapsed():.0f}s] cache {method}: {payload['cache'][method]}", flush=True)

    # ---- 2. step time and peak memory, interleaved rounds over the same first batches
    variants = ["ce"] + [m for m in ("sampled", "topk") if m in bench.caches] + ["online"]
    if not args.skip_trl:
        try:
            import trl  # noqa: F401
            from trl.experimental.gkd import GKDTrainer  # noqa: F401

            variants.append("trl")
            payload["trl_version"] = trl.__version__
        except ImportError as err:
            payload["skipped"].append(f"trl: {err}")
    steps = args.timing_steps + args.timing_warmup
    for round_index, order in enumerate((variants, list(reversed(variants)))):
        for variant in order:
            if not bench.fits(f"step timing {variant} round {round_index}", steps * t_on * 2 + 4):
                continue
            result, model = bench.run(variant, steps, constant=True)
            del model
            entry = payload["steps"].setdefault(variant, {"rounds": []})
            entry["rounds"].append(result)
            times = [t for r in entry["rounds"] for t in r["step_times_s"][args.timing_warmup :]]
            entry["median_step_ms"] = round(1000 * statistics.median(times), 3)
            entry["peak_mib"] = max((r["peak_mib"] or 0) for r in entry["rounds"]) or None
            bench.save()
        print(
            f"[{bench.elapsed():.0f}s] step timing round {round_index}: "
            + ", ".join(f"{k} {v['median_step_ms']} ms" for k, v in payload["steps"].items()),
            flush=True,
        )

    # ---- 3. epochs: wall time and perplexity, same tokens and order
    payload["perplexity"]["teacher"] = round(bench.perplexity(bench.teacher), 4)
    bench.teacher_on(False)
    initial = bench.student()
    payload["perplexity"]["student_before_training"] = round(bench.perplexity(initial), 4)
    del initial
    bench.save()
    step_ms = {k: v["median_step_ms"] / 1000 for k, v in payload["steps"].items()}
    for variant in ("sampled", "online", "ce", "topk"):
        if variant in ("sampled", "topk") and variant not in bench.caches:
            continue
        per_step = step_ms.get(variant, t_on) * 1.1 + 0.005
        if not bench.fits(f"epoch {variant}", payload["train_steps_per_epoch"] * per_step + 8):
            continue
        result, model = bench.run(variant, None, constant=False)
        result.pop("step_times_s")
        result["perplexity"] = round(bench.perplexity(model), 4)
        del model
        payload["epochs"][variant] = result
        payload["perplexity"][variant] = result["perplexity"]
        bench.save()
        print(f"[{bench.elapsed():.0f}s] epoch {variant}: {result}", flush=True)


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def report(payload: dict) -> None:
    steps, epochs, cache, ppl = payload["steps"], payload["epochs"], payload["cache"], payload["perplexity"]
    step = {k: v.get("median_step_ms") for k, v in steps.items()}
    epoch = {k: v.get("train_runtime_s") for k, v in epochs.items()}
    print(
        f"\n# Offline distillation: {payload['env']['device']}; teacher {payload.get('data', {}).get('teacher_parameters')}"
        f" params -> student {payload.get('data', {}).get('student_layers')} layers; "
        f"{payload.get('train_tokens')} training tokens ({payload.get('train_steps_per_epoch')} steps of "
        f"{payload['settings']['batch_size']} x {payload['settings']['seq_len']}); elapsed {payload.get('elapsed_s')} s\n"
    )
    headline = [
        ["epoch cached sampled / epoch CE", ratio(epoch.get("sampled"), epoch.get("ce")), "<= 1.10"],
        ["epoch cached topk / epoch CE", ratio(epoch.get("topk"), epoch.get("ce")), "<= 1.10"],
        ["step TRL GKD / step cached sampled", ratio(step.get("trl"), step.get("sampled")), ">= 2"],
        ["step TRL GKD / step cached topk", ratio(step.get("trl"), step.get("topk")), ">= 2"],
        ["ppl cached sampled / ppl online - 1", _rel(ppl.get("sampled"), ppl.get("online")), "within +-0.02"],
        ["ppl cached topk / ppl online - 1", _rel(ppl.get("topk"), ppl.get("online")), "-"],
        ["bytes per token, sampled", cache.get("sampled", {}).get("bytes_per_token"), "-"],
        ["bytes per token, topk", cache.get("topk", {}).get("bytes_per_token"), "-"],
    ]
    print(markdown_table(["figure", "measured", "goal"], headline))
    if cache:
        print()
        print(
            markdown_table(
                ["cache", "k", "bytes/token", "targets MiB", "cache s", "tokens/s"],
                [
                    [m, c["k"], c["bytes_per_token"], c["target_mb"], c["cache_s"], c["tokens_per_s"]]
                    for m, c in cache.items()
                ],
            )
        )
    if steps:
        print()
        print(
            markdown_table(
                ["step (same batches)", "median ms", "vs CE", "peak MiB"],
                [
                    [k, v.get("median_step_ms"), ratio(v.get("median_step_ms"), step.get("ce")), v.get("peak_mib")]
                    for k, v in steps.items()
                ],
            )
        )
    if epochs or ppl:
        print()
        rows = [
            [
                k,
                v.get("tokens"),
                v.get("train_runtime_s"),
                ratio(v.get("train_runtime_s"), epoch.get("ce")),
                v.get("median_step_ms"),
                v.get("perplexity"),
            ]
            for k, v in epochs.items()
        ]
        rows += [[k, None, None, None, None, v] for k, v in ppl.items() if k not in epochs]
        print(
            markdown_table(
                ["epoch", "tokens", "wall s", "vs CE", "median step ms", f"{payload['settings']['eval_split']} ppl"],
                rows,
            )
        )
    if payload["skipped"]:
        print("\nskipped: " + "; ".join(payload["skipped"]))
    print(json.dumps({"headline": {row[0]: row[1] for row in headline}}))


def _rel(a, b):
    return round(a / b - 1, 4) if a is not None and b else None


if __name__ == "__main__":
    main()
