"""Distillation loss at LLM scale (issue 14): the fused LM-head loss against materialised logits, TRL and Liger.

Part `main` (one GPU, one process, models from configs, bf16 autocast with fp32 student master weights, a bf16
teacher; the same token batches for every variant; timings interleaved round by round, medians):
  fused          DistillationTrainer, fused_lm_head_loss=True  (forward KL, T=1, alpha=1: TRL GKD's objective)
  fused_eager    the same with HF_COMPRESS_FUSED_LOSS_COMPILE=0 (no torch.compile of the chunk math)
  materialised   DistillationTrainer, fused_lm_head_loss=False (full logits of both models)
  trl_gkd        TRL 1.16 GKDTrainer, lmbda=0, beta=0 (forward KL(teacher || student)), seq_kd=False; its loss
                 always uses temperature 1 (GKDConfig.temperature is the sampling temperature)
  trl_gkd_liger  the same with use_liger_kernel=True (Liger patches the student's RMSNorm/RoPE/SwiGLU; GKDTrainer
                 1.16 still builds full logits: its compute_loss has no Liger loss)
  fused_default  DistillationTrainer fused with the library defaults (T=2, alpha=0.5: KL + cross-entropy), 152k only
  student_step   a plain Trainer step of the student (its own cross-entropy, full logits)
  teacher_fwd    the teacher's forward alone (full logits), no grad, under the same autocast
  floor          student body forward/backward + teacher body forward with a loss on the hidden states, no heads
Every step is `training_step` + AdamW step + zero_grad on its own copy of the same student (num_items_in_batch
None: a per-micro-batch mean for every variant). Reported: median step time; peak memory of the step above what was
allocated before it; loss memory = that peak minus the floor's; the largest batch that fits, extrapolated from peak
memory at two batch sizes (per-sample slope; GPU capacity x 0.95 minus the variant's resident student, AdamW
states and teacher), not bisected; the step-cost ratio fused / (student_step + teacher_fwd).
TRL's per-step torch.cuda.empty_cache() is replaced by a no-op so it does not flush the allocator under the
other variants in the interleaved rounds (it would only make TRL slower).

Part `smollm2`: SmolLM2-135M-Instruct teacher -> 15-of-30-layer student (create_student), WikiText-2, a few
DistillationTrainer steps fused and materialised from identical students (fp32, TF32 off): per-step losses.

    python benchmarks/gpu/distill_llm_loss.py --budget-s 270              # part main on a GPU
    python benchmarks/gpu/distill_llm_loss.py --part smollm2 --budget-s 60
    python benchmarks/gpu/distill_llm_loss.py --smoke --part all          # CPU, tiny shapes, < 60 s

Writes $OUT/distill_llm_loss.json (or distill_llm_loss_smollm2.json) after every measurement; prints Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import environment, has_cuda, markdown_table, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hf_compress import DistillationConfig, DistillationTrainer  # noqa: E402

START = time.perf_counter()
TEACHER = dict(hidden_size=1536, num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=2,
               intermediate_size=4096)  # fmt: skip
STUDENT = dict(hidden_size=896, num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2,
               intermediate_size=4864)  # fmt: skip
SMOKE_TEACHER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128)  # fmt: skip
SMOKE_STUDENT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64)  # fmt: skip
# (vocabulary, sequence length, batch size), most important first
GPU_CONFIGS = [(151936, 2048, 8), (32000, 2048, 8), (151936, 8192, 2)]
SMOKE_CONFIGS = [(1024, 32, 2)]


def elapsed() -> float:
    return time.perf_counter() - START


def build(spec: dict, vocab: int, seq: int, seed: int, dtype, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, max_position_embeddings=max(seq, 64), tie_word_embeddings=False,
                         use_cache=False, **spec)  # fmt: skip
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to(dtype)


def tokenizer_for(vocab: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="t0")),
        pad_token="t0",
        eos_token="t1",
    )


def make_batches(n: int, batch: int, seq: int, vocab: int, device: str) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(2, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": ids.clone().to(device)})  # fmt: skip
    return out


def _peak(fn) -> float | None:
    """Peak memory (MiB) of one call above what was allocated before it (CUDA only)."""
    if not has_cuda():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class Variants:
    """The trainers of one configuration: each owns a copy of the same student and steps on a given batch."""

    def __init__(self, vocab: int, seq: int, device: str, smoke: bool, with_default: bool):
        from transformers import Trainer, TrainingArguments

        self.device = device
        cuda = device == "cuda"
        t_spec, s_spec = (SMOKE_TEACHER, SMOKE_STUDENT) if smoke else (TEACHER, STUDENT)
        self.teacher = build(t_spec, vocab, seq, 1, torch.bfloat16, device).eval().requires_grad_(False)
        student = build(s_spec, vocab, seq, 2, torch.float32, device)
        self.student_params = sum(p.numel() for p in student.parameters())
        self.teacher_bytes = sum(p.numel() * p.element_size() for p in self.teacher.parameters())
        common = dict(report_to="none", use_cpu=not cuda, save_strategy="no", learning_rate=1e-5, bf16=True,
                      disable_tqdm=True, gradient_checkpointing=False)  # fmt: skip
        self.trainers: dict[str, object] = {}
        self.errors: dict[str, str] = {}
        self.eager: set[str] = set()

        def distill(name, fused, student=student, **kw):
            args = DistillationConfig(output_dir=f"/tmp/bench_{name}", fused_lm_head_loss=fused, **common, **kw)
            self.trainers[name] = DistillationTrainer(model=copy.deepcopy(student), teacher_model=self.teacher,
                                                      args=args)  # fmt: skip

        kl = dict(loss_type="forward_kl", temperature=1.0, alpha=1.0)
        distill("fused", True, **kl)
        distill("fused_eager", True, **kl)
        self.eager.add("fused_eager")
        distill("materialised", False, **kl)
        if with_default:
            distill("fused_default", True)
        for name, liger in (("trl_gkd", False), ("trl_gkd_liger", True)):
            try:
                self.trainers[name] = self._gkd(student, vocab, common, liger)
            except Exception as err:  # noqa: BLE001 - recorded, the other variants go on
                self.errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        self.trainers["student_step"] = Trainer(
            model=copy.deepcopy(student), args=TrainingArguments(output_dir="/tmp/bench_plain", **common)
        )
        self.floor_student = copy.deepcopy(student)
        self.floor_opt = torch.optim.AdamW(self.floor_student.parameters(), lr=1e-5)
        for trainer in self.trainers.values():
            trainer.create_optimizer_and_scheduler(num_training_steps=1000)
            trainer.current_gradient_accumulation_steps = 1  # normally set by the training loop
        self.autocast = self.trainers["fused"].autocast_smart_context_manager
        del student

    def _gkd(self, student, vocab, common, liger):
        if liger and self.device != "cuda":
            raise RuntimeError("Liger-Kernel needs CUDA (triton)")
        import datasets
        import trl.experimental.gkd.gkd_trainer as gkd_module
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        gkd_module.empty_cache = lambda: None  # see the module docstring
        args = GKDConfig(output_dir="/tmp/bench_gkd", lmbda=0.0, beta=0.0, seq_kd=False, use_liger_kernel=liger,
                         max_length=None, **common)  # fmt: skip
        train = datasets.Dataset.from_dict({"input_ids": [[2, 3, 4]]})
        return GKDTrainer(model=copy.deepcopy(student), teacher_model=self.teacher, args=args, train_dataset=train,
                          processing_class=tokenizer_for(vocab), data_collator=lambda rows: rows)  # fmt: skip

    def step_fn(self, name: str, batch: dict):
        if name == "teacher_fwd":

            def teacher_forward():
                with torch.no_grad(), self.autocast():
                    self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

            return teacher_forward
        if name == "floor":

            def floor():
                with self.autocast():
                    hidden = self.floor_student.model(input_ids=batch["input_ids"],
                                                      attention_mask=batch["attention_mask"]).last_hidden_state  # fmt: skip
                    with torch.no_grad():
                        self.teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    loss = hidden.float().pow(2).mean()
                loss.backward()
                self.floor_opt.step()
                self.floor_opt.zero_grad(set_to_none=True)

            return floor
        trainer = self.trainers[name]

        def step():
            ctx = _env("HF_COMPRESS_FUSED_LOSS_COMPILE", "0") if name in self.eager else contextlib.nullcontext()
            with ctx:
                loss = trainer.training_step(trainer.model, dict(batch))
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            return loss

        return step

    def names(self) -> list[str]:
        return [*self.trainers, "teacher_fwd", "floor"]

    def resident_bytes(self, name: str) -> int:
        """Memory a run of this variant alone keeps between steps: fp32 student + AdamW states, the teacher."""
        if name in ("teacher_fwd",):
            return self.teacher_bytes
        return self.student_params * 4 * 3 + self.teacher_bytes


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def measure_config(vocab, seq, batch, device, smoke, rounds, warmup, deadline, with_default, result, save) -> dict:
    """Fills `result` phase by phase (calling `save()` after each, so a kill keeps what was measured)."""
    result.update({"vocab": vocab, "seq_len": seq, "batch_size": batch, "tokens_per_step": seq * batch})
    variants = Variants(vocab, seq, device, smoke, with_default)
    result["errors"] = dict(variants.errors)
    result["student_params"] = variants.student_params
    result["teacher_params_bytes"] = variants.teacher_bytes
    data = make_batches(2, batch, seq, vocab, device)
    live = [n for n in variants.names()]
    first_loss: dict[str, float] = {}
    # warm-up (compiles the fused chunk math on the first fused call) and the first-step loss of each variant
    for i in range(warmup):
        for name in list(live):
            try:
                out = variants.step_fn(name, data[0])()
                if i == 0 and out is not None:
                    first_loss[name] = float(out)
            except Exception as err:  # noqa: BLE001
                live.remove(name)
                result["errors"][name] = ("OOM: " if _is_oom(err) else f"{type(err).__name__}: ") + str(err)[:300]
                if has_cuda():
                    torch.cuda.empty_cache()
    result["first_step_loss"] = first_loss
    save()
    # peak memory of one step at this batch size
    peaks = {}
    for name in list(live):
        try:
            peaks[name] = _peak(variants.step_fn(name, data[1]))
        except Exception as err:  # noqa: BLE001
            live.remove(name)
            result["errors"][name] = ("OOM: " if _is_oom(err) else f"{type(err).__name__}: ") + str(err)[:300]
            torch.cuda.empty_cache() if has_cuda() else None
    result["peak_step_mib"] = peaks
    save()
    # interleaved timing rounds, order alternating; stop early (>= 3 rounds) when the budget runs out
    times = {name: [] for name in live}
    for r in range(rounds):
        if r >= 3 and elapsed() > deadline:
            break
        order = list(live) if r % 2 == 0 else list(reversed(live))
        for name in order:
            if name not in live:
                continue
            fn = variants.step_fn(name, data[r % 2])
            if has_cuda():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - e.g. OOM next to the other variants: drop this one
                live.remove(name)
                result["errors"][name] = ("OOM: " if _is_oom(err) else f"{type(err).__name__}: ") + str(err)[:300]
                if has_cuda():
                    torch.cuda.empty_cache()
                continue
            if has_cuda():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    result["rounds"] = max((len(v) for v in times.values()), default=0)
    result["step_ms"] = {n: statistics.median(v) * 1e3 for n, v in times.items() if v}
    save()
    # peak memory at half the batch: per-sample slope -> largest batch that fits (extrapolated)
    if has_cuda() and batch >= 2 and elapsed() < deadline + 30:
        half = make_batches(1, batch // 2, seq, vocab, device)[0]
        capacity = torch.cuda.get_device_properties(0).total_memory * 0.95 / 2**20
        est = {}
        for name in live:
            if name in ("teacher_fwd",) or name not in peaks:
                continue
            try:
                low = _peak(variants.step_fn(name, half))
            except Exception as err:  # noqa: BLE001
                result["errors"][f"{name}_half_batch"] = f"{type(err).__name__}: {str(err)[:200]}"
                continue
            slope = (peaks[name] - low) / (batch - batch // 2)
            fixed = peaks[name] - slope * batch
            room = capacity - variants.resident_bytes(name) / 2**20 - fixed
            est[name] = {"peak_half_batch_mib": low, "mib_per_sample": slope,
                         "max_batch_est": int(room // slope) if slope > 0 else None}  # fmt: skip
        result["max_batch"] = est
    floor = peaks.get("floor")
    if floor is not None:
        result["loss_memory_mib"] = {n: p - floor for n, p in peaks.items() if n not in ("floor", "teacher_fwd")}
    ms = result["step_ms"]
    if {"student_step", "teacher_fwd"} <= set(ms):
        denominator = ms["student_step"] + ms["teacher_fwd"]
        result["step_cost_ratio"] = {n: ms[n] / denominator for n in ("fused", "fused_default", "materialised",
                                                                      "fused_eager") if n in ms}  # fmt: skip
    del variants
    if has_cuda():
        torch.cuda.empty_cache()
    return result


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def print_goals(results: list[dict]) -> None:
    """The issue's goals, fused against materialised, one row per configuration (printed first)."""
    rows = []
    for r in results:
        ms, mem, mb = r.get("step_ms", {}), r.get("loss_memory_mib", {}), r.get("max_batch", {})
        if not ms:
            continue
        best = lambda d, k: d.get(k, {}).get("max_batch_est") if isinstance(d.get(k), dict) else None  # noqa: E731
        rows.append([
            f"{r['vocab']} / {r['batch_size']}x{r['seq_len']}",
            _ratio(mem.get("fused"), mem.get("materialised")), _ratio(ms.get("fused"), ms.get("materialised")),
            _ratio(best(mb, "fused"), best(mb, "materialised")), r.get("step_cost_ratio", {}).get("fused"),
            r.get("step_cost_ratio", {}).get("fused_default"),
            _ratio(mem.get("fused"), mem.get("trl_gkd")), _ratio(ms.get("fused"), ms.get("trl_gkd")),
            _ratio(mem.get("fused"), mem.get("trl_gkd_liger")), _ratio(ms.get("fused"), ms.get("trl_gkd_liger")),
        ])  # fmt: skip
    print(
        markdown_table(
            [
                "vocab / tokens",
                "loss mem fused/mat. (<=0.25)",
                "time fused/mat. (<=1)",
                "max batch fused/mat. (>=2)",
                "step-cost ratio (<=1.03)",
                "ratio, T=2 a=0.5",
                "loss mem fused/TRL",
                "time fused/TRL",
                "loss mem fused/TRL+Liger",
                "time fused/TRL+Liger",
            ],
            rows,
        )  # fmt: skip
    )


def print_main(results: list[dict]) -> None:
    for r in results:
        if "step_ms" not in r:
            continue
        ms, peak, loss_mem = r["step_ms"], r.get("peak_step_mib", {}), r.get("loss_memory_mib", {})
        maxb = r.get("max_batch", {})
        base = "materialised"
        print(f"\n## vocab {r['vocab']}, {r['batch_size']} x {r['seq_len']} tokens, medians of {r['rounds']} rounds")
        rows = []
        for name in ms:
            mb = maxb.get(name, {}).get("max_batch_est")
            rows.append([
                name, ms[name], _ratio(ms[name], ms.get(base)), loss_mem.get(name),
                _ratio(loss_mem.get(name), loss_mem.get(base)), peak.get(name),
                mb, _ratio(mb, maxb.get(base, {}).get("max_batch_est")), r["first_step_loss"].get(name),
            ])  # fmt: skip
        print(
            markdown_table(
                [
                    "variant",
                    "step ms",
                    "x materialised",
                    "loss MiB (peak - floor)",
                    "x materialised",
                    "step peak MiB",
                    "max batch (extrapolated)",
                    "x materialised",
                    "first-step loss",
                ],
                rows,
            )  # fmt: skip
        )
        if "step_cost_ratio" in r:
            print("step-cost ratio distill / (student step + teacher fwd):",
                  ", ".join(f"{k} {v:.3f}" for k, v in r["step_cost_ratio"].items()))  # fmt: skip
        if r.get("errors"):
            print("errors:", r["errors"])


def run_main(args, device) -> None:
    configs = SMOKE_CONFIGS if args.smoke else GPU_CONFIGS
    if args.configs:
        configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    rounds = args.rounds or (2 if args.smoke else 10)
    warmup = 1 if args.smoke else 2
    payload = {"benchmark": "distill_llm_loss", "part": "main", "smoke": args.smoke, "env": environment(),
               "teacher": SMOKE_TEACHER if args.smoke else TEACHER,
               "student": SMOKE_STUDENT if args.smoke else STUDENT, "results": []}  # fmt: skip
    _add_versions(payload["env"])
    budget = args.budget_s
    for i, (vocab, seq, batch) in enumerate(configs):
        left = budget - elapsed()
        share = left / (len(configs) - i)  # the rest of the budget, split over the configs still to run
        if i > 0 and left < 25:
            payload["results"].append({"vocab": vocab, "seq_len": seq, "batch_size": batch, "skipped": "budget"})
            continue
        deadline = elapsed() + share - (5 if not args.smoke else 0)
        res: dict = {}
        payload["results"].append(res)

        def save():
            write_json("distill_llm_loss", payload, args.json)

        try:
            measure_config(vocab, seq, batch, device, args.smoke, rounds, warmup, deadline,
                           with_default=(vocab > 100000 or args.smoke) and i == 0, result=res, save=save)  # fmt: skip
        except Exception as err:  # noqa: BLE001 - keep what was measured for the other configs
            res["error"] = f"{type(err).__name__}: {err}"[:500]
            if has_cuda():
                torch.cuda.empty_cache()
        res["elapsed_s"] = elapsed()
        from hf_compress.distillation import losses

        res["fp32_out_gemm_used"] = losses._FP32_OUT_GEMM
        res["compiled_chunk_math"] = losses._COMPILED_CHUNK_LOSSES is not None and (
            losses._COMPILED_CHUNK_LOSSES is not losses._chunk_losses
        )
        save()
        print(f"[{elapsed():.0f}s] done vocab {vocab} {batch}x{seq}", flush=True)
    print(f"\n# Distillation loss at LLM scale: {payload['env']['device']}: goals (fused vs the others)")
    print_goals(payload["results"])
    print_main(payload["results"])


def _add_versions(env: dict) -> None:
    for mod in ("trl", "liger_kernel", "peft"):
        try:
            from importlib.metadata import version

            env[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001
            env[mod] = None


def run_smollm2(args, device) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress import create_student
    from hf_compress.utils.loading import smollm2_folder

    payload = {"benchmark": "distill_llm_loss", "part": "smollm2", "smoke": args.smoke, "env": environment()}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    seq, batch, steps = (32, 2, 2) if args.smoke else (512, 8, 8)
    text_file = Path(args.data_dir) / "train.txt"
    text = text_file.read_text(encoding="utf-8")[: (400_000 if not args.smoke else 20_000)]
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    if args.smoke:  # CPU: a 6-layer cut of the real model as the teacher, so the smoke run stays short
        teacher = create_student(teacher, num_layers=6)
    student0 = create_student(teacher, num_layers=teacher.config.num_hidden_layers // 2)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    need = seq * batch * steps
    chunks = ids[: need - need % seq].reshape(-1, seq)
    if chunks.shape[0] < batch * steps:
        raise RuntimeError(f"not enough WikiText-2 tokens in {text_file} for {batch * steps} x {seq}")
    rows = [{"input_ids": c, "attention_mask": torch.ones_like(c), "labels": c.clone()} for c in chunks]
    from torch.utils.data import Dataset

    class Rows(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    payload.update({"teacher_layers": teacher.config.num_hidden_layers, "student_layers":
                    student0.config.num_hidden_layers, "seq_len": seq, "batch_size": batch, "steps": steps,
                    "precision": "fp32, TF32 off", "data": str(text_file)})  # fmt: skip
    logs = {}
    for fused in (True, False):
        student = copy.deepcopy(student0).to(device)
        cfg = DistillationConfig(
            output_dir="/tmp/bench_smollm2", max_steps=steps, per_device_train_batch_size=batch, learning_rate=5e-5,
            logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
            use_cpu=device == "cpu", fused_lm_head_loss=fused, temperature=2.0, alpha=0.5,
        )  # fmt: skip
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=Rows())
        t0 = time.perf_counter()
        trainer.train()
        used = trainer._fused_lm_heads is not None
        logs[fused] = {"fused_path_used": used, "seconds": time.perf_counter() - t0,
                       "history": [{k: h[k] for k in ("step", "loss", "loss_distill", "loss_task") if k in h}
                                   for h in trainer.state.log_history if "loss_distill" in h]}  # fmt: skip
        del trainer, student
        payload["runs"] = {"fused" if k else "materialised": v for k, v in logs.items()}
        write_json("distill_llm_loss_smollm2", payload, args.json)
    payload["bf16_gradient_check"] = _bf16_gradient_check(student0, teacher, rows[:batch], device)
    write_json("distill_llm_loss_smollm2", payload, args.json)
    diffs = []
    for a, b in zip(logs[True]["history"], logs[False]["history"]):
        for key in ("loss", "loss_distill", "loss_task"):
            if key in a and key in b:
                diffs.append(abs(a[key] - b[key]) / max(abs(b[key]), 1e-12))
    payload["max_relative_difference"] = max(diffs) if diffs else None
    write_json("distill_llm_loss_smollm2", payload, args.json)
    print(
        f"\n# SmolLM2-135M ({payload['teacher_layers']} layers) -> {payload['student_layers']} layers, {batch} x {seq} WikiText-2, fp32: per-step losses"
    )
    rows = []
    for a, b in zip(logs[True]["history"], logs[False]["history"]):
        rows.append([a.get("step"), a.get("loss"), b.get("loss"), a.get("loss_distill"), b.get("loss_distill"),
                     abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12)])  # fmt: skip
    print(markdown_table(["step", "loss fused", "loss materialised", "distill fused", "distill materialised",
                          "rel. diff"], rows))  # fmt: skip
    print("bf16 autocast, one step, fused vs materialised:", payload["bf16_gradient_check"])
    print(f"fused path used: {logs[True]['fused_path_used']}; max relative difference over all logged parts: "
          f"{payload['max_relative_difference']}")  # fmt: skip


def _bf16_gradient_check(student0, teacher, rows, device) -> dict:
    """One training step under bf16 autocast (fp32 master weights), fused vs materialised from the same student:
    relative difference of the loss and of every parameter's gradient (bf16 rounding is the expected size)."""
    from hf_compress.distillation import losses

    batch = {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]}
    grads, loss = {}, {}
    for fused in (True, False):
        student = copy.deepcopy(student0).to(device)
        cfg = DistillationConfig(output_dir="/tmp/bench_smollm2_bf16", report_to="none", save_strategy="no",
                                 bf16=True, use_cpu=device == "cpu", fused_lm_head_loss=fused)  # fmt: skip
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg)
        trainer.current_gradient_accumulation_steps = 1
        loss[fused] = float(trainer.training_step(student, dict(batch)))
        grads[fused] = {
            n: p.grad.detach().float().clone() for n, p in student.named_parameters() if p.grad is not None
        }
        del trainer, student
    worst = max(
        (float((grads[True][n] - grads[False][n]).norm() / grads[False][n].norm().clamp_min(1e-30)), n)
        for n in grads[False]
    )
    return {
        "loss_fused": loss[True],
        "loss_materialised": loss[False],
        "loss_relative_difference": abs(loss[True] - loss[False]) / abs(loss[False]),
        "max_grad_relative_difference": worst[0],
        "worst_parameter": worst[1],
        "fp32_out_gemm_used": losses._FP32_OUT_GEMM,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    parser.add_argument("--part", choices=["main", "smollm2", "all"], default="main")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="wall-clock budget (default 270 main, 60 smollm2)"
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--configs", default=None, help="e.g. 151936x2048x8,32000x2048x8 (vocab x seq x batch)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.data_dir is None:
        shared = Path("../shared/data/wikitext2")
        args.data_dir = str(shared if shared.exists() else Path(".gpudata/wikitext2"))
    cuda = has_cuda()
    if not cuda and not args.smoke:
        parser.error("no CUDA device: run with --smoke on CPU")
    device = "cuda" if cuda else "cpu"
    if args.part in ("main", "all"):
        if args.budget_s is None:
            args.budget_s = 270
        elif args.part == "all":
            args.budget_s -= 60  # what the smollm2 part needs
        run_main(args, device)
    if args.part in ("smollm2", "all"):
        run_smollm2(args, device)


if __name__ == "__main__":
    main()
