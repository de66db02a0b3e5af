"""Running a recipe: every stage in order, each writing its folder and report; the one place stages are composed
(`hf-compress run` and `hf-compress demo` both come here)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..utils.output import (
    LIBRARY_FILES,
    REPORT_FILES,
    TRAINER_FILES,
    check_output_dir,
    clear_library_files,
    library_files,
)
from .data import _load_data, load_text_blocks
from .recipe import (
    Recipe,
    Stage,
    _training_class,
    check_stage_steps,
    load_recipe,
    resolve_recipe_model,
    training_steps,
)

logger = logging.get_logger(__name__)


# what a stage writes into its folder: the model, tokenizer, report files and the files of its Trainer run
_STAGE_FILES = LIBRARY_FILES + TRAINER_FILES


def _load_model(name_or_path: str):
    import torch

    from ..reporting import load_model

    # On the GPU when there is one: the stages train there, and the reports evaluate where the model is.
    model = load_model(os.path.expanduser(name_or_path), device="cuda" if torch.cuda.is_available() else None)
    model.train()
    return model


@dataclass
class _Run:
    """What the stages of one recipe run share: the data, and the model as it goes from stage to stage."""

    recipe: Recipe
    tokenizer: Any
    train_set: Any
    eval_set: Any
    collator: Any
    report_kwargs: dict[str, Any]
    model: Any = None
    teacher: Any = None
    methods: list[str] = field(default_factory=list)
    rows: list[Any] = field(default_factory=list)

    def measure(self, name: str, model_or_path: Any, methods: list[str]):
        from ..metrics import make_compute_metrics
        from ..reporting import compression_report

        causal_lm = self.recipe.task == "causal-lm"
        return compression_report(
            {name: model_or_path},
            eval_dataset=self.eval_set,
            # causal LMs: compression_report measures perplexity itself
            compute_metrics=None if causal_lm else make_compute_metrics("sequence-classification"),
            task="causal-lm" if causal_lm else "sequence-classification",
            processing_class=self.tokenizer,
            data_collator=self.collator,
            methods={name: methods},
            **self.report_kwargs,
        ).rows[0]

    def calibration_batches(self) -> list[dict[str, Any]]:
        """Calibration batches without labels: 4 x 8 training examples, or for causal LMs
        `dataset.calibration_batches` (default 32) single blocks spread over the training text."""
        if self.recipe.task == "causal-lm":
            count = min(int(self.recipe.dataset.get("calibration_batches", 32)), len(self.train_set))
            step = max(len(self.train_set) // max(count, 1), 1)
            batches = [self.collator([self.train_set[i * step]]) for i in range(count)]
        else:
            batches = [self.collator([self.train_set[i] for i in range(b * 8, b * 8 + 8)]) for b in range(4)]
        for batch in batches:
            batch.pop("labels", None)
        return batches


def run_recipe(recipe: Recipe | str | os.PathLike | Mapping[str, Any], **overrides: Any):
    """Run every stage of a recipe in order; returns the [`~hf_compress.CompressionReport`] after the last stage.

    Each stage writes `output_dir/<n>_<name>/` (the model, its tokenizer, a model card and `report.md` /
    `report.json` with the input model and every stage so far, measured on the evaluation split). An existing
    stage folder is never overwritten unless the recipe (or `overwrite=True`) says so; this is checked for every
    stage before the first one runs, and `overwrite` replaces only what hf_compress wrote there. The wall time of
    every stage (its training, saving and measuring) is in `report.timings` and the final `report.json`.
    """
    from transformers import DataCollatorWithPadding, default_data_collator

    from ..utils.loading import load_tokenizer

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, **overrides)
    elif overrides:
        raise ValueError("overrides are only applied when the recipe is given as a file or dict.")
    start = time.perf_counter()
    for key in ("model", "teacher", "tokenizer"):  # a missing folder fails now, not after ~50 s of Hub retries
        if getattr(recipe, key):
            setattr(recipe, key, resolve_recipe_model(getattr(recipe, key), key, None))
    folders = recipe.stage_dirs()
    _prepare_output(recipe, folders)

    # a `.gguf` model carries its tokenizer
    tokenizer = load_tokenizer(os.path.expanduser(recipe.tokenizer or recipe.model))
    if recipe.task == "causal-lm":
        train_set, eval_set = load_text_blocks(recipe.dataset, tokenizer)
        collator = default_data_collator
    else:
        train_set, eval_set = _load_data(recipe, tokenizer, _label2id(recipe.model))
        collator = DataCollatorWithPadding(tokenizer)
    _check_steps(recipe, len(train_set))  # schedules against each stage's length, before any stage trains
    report_kwargs = {"batch_size": 32, "latency_batches": 3, "warmup": 1, **recipe.report}
    include_input = report_kwargs.pop("include_input", True)
    run = _Run(recipe, tokenizer, train_set, eval_set, collator, report_kwargs)
    run.model = _load_model(recipe.model)
    run.teacher = _load_model(recipe.teacher) if recipe.teacher else None
    if include_input:
        run.rows.append(run.measure("input", run.model, []))
    timings = {"data": time.perf_counter() - start}
    for stage in recipe.stages:
        stage_start = time.perf_counter()
        report = _run_stage(run, stage, folders[stage.name])
        timings[stage.name] = time.perf_counter() - stage_start
    timings["total"] = time.perf_counter() - start
    report.timings = timings  # type: ignore[attr-defined]
    _write_report(report, Path(recipe.output_dir), {"timings_s": timings})
    return report


def _label2id(model: str) -> dict[str, int]:
    from transformers import AutoConfig

    return dict(getattr(AutoConfig.from_pretrained(model), "label2id", None) or {})


def _check_steps(recipe: Recipe, num_train_examples: int) -> None:
    import torch

    for stage in recipe.stages:
        if stage.args is None:
            continue
        cls = _training_class(stage)
        defaults = {"report_to": "none", "save_strategy": "no", "use_cpu": not torch.cuda.is_available()}
        args = cls(output_dir=str(Path(recipe.output_dir) / stage.folder_name), **{**defaults, **stage.args})
        check_stage_steps(stage, training_steps(args, num_train_examples))


def _run_stage(run: _Run, stage: Stage, folder: Path):
    """One stage: its one-shot step, its Trainer run (`args`), the save, the measurement and the stage report."""
    from ..reporting import CompressionReport, write_model_card

    folder.mkdir(parents=True, exist_ok=True)
    logger.info(f"hf_compress recipe: {stage.label} -> {folder}")
    quantized, callbacks = _apply_stage(run, stage, folder)
    if stage.args is not None:
        run.model = _train(run, stage, folder, callbacks)
    run.model.eval()
    if stage.type == "quantize":
        measured = folder
        run.model = quantized
    elif stage.type == "qat":
        run.model.save_pretrained(folder / "float")
        measured = folder / "quantized"
    else:
        run.model.save_pretrained(folder)
        run.tokenizer.save_pretrained(folder)
        measured = folder
    row = run.measure(stage.row_name, measured, list(run.methods))
    run.rows.append(row)
    reference = run.rows[0] if run.rows[0] is not row else None
    reference_figures = {"name": reference.name, "size_mb": reference.disk_mb} if reference else None
    write_model_card(folder, _row_figures(row), run.methods, reference_figures)
    report = CompressionReport(rows=list(run.rows), task=run.recipe.task)
    _write_report(report, folder)
    logger.info(f"hf_compress recipe: after {stage.label}:\n{report.to_markdown()}")
    if stage.type not in ("quantize", "qat"):
        run.model.train()
    return report


def _apply_stage(run: _Run, stage: Stage, folder: Path) -> tuple[Any, list[Any]]:
    """The stage's own step before any training; returns the quantized model (quantize) and the callbacks."""
    callbacks: list[Any] = []
    if stage.type == "finetune" and stage.distill_from_teacher:
        run.methods.append(f"distillation fine-tune ({_describe(stage.args)})")
    elif stage.type == "distill":
        from ..distillation import create_student

        run.teacher = run.model
        run.teacher.eval()
        run.model = create_student(run.teacher, **stage.student)
        run.methods.append(f"distillation into {stage.student or 'a copy'} ({_describe(stage.args)})")
    elif stage.type == "structured_prune":
        _structured_prune(run, stage.config)
    elif stage.type == "prune":
        from ..pruning import PruningCallback, PruningConfig, make_pruning_permanent_, prune_

        if stage.structured:
            _structured_prune(run, stage.structured)
        cfg = PruningConfig(**stage.config)
        calibration = run.calibration_batches() if cfg.requires_calibration else None
        if stage.args is None:
            masks = prune_(run.model, cfg, calibration_data=calibration) if calibration else prune_(run.model, cfg)
            make_pruning_permanent_(run.model, masks if isinstance(masks, dict) else None)
        else:
            callbacks.append(PruningCallback(cfg, calibration_data=calibration))
        run.methods.append(f"unstructured pruning ({_describe(stage.config)})")
    elif stage.type == "quantize":
        import copy

        import torch

        from ..quantization import quantize_model

        source = run.model
        if stage.storage_dtype is not None:
            source = copy.deepcopy(run.model).to(getattr(torch, stage.storage_dtype))
        quantized = quantize_model(
            source, output_dir=folder, processing_class=run.tokenizer, overwrite=True, **stage.config
        )
        run.methods.append(f"post-training quantization ({_describe(stage.config) or 'nf4'})")
        return quantized, callbacks
    elif stage.type == "qat":
        from ..quantization import QATCallback

        # Absolute: QATCallback takes a relative output_dir under the Trainer's output_dir, and a recipe's
        # output_dir is usually relative to the working directory (the quantized model ended up in
        # <stage>/<output_dir>/<stage>/quantized).
        target = (folder / "quantized").resolve()
        callbacks.append(QATCallback(**stage.config, output_dir=str(target), overwrite=True))
        run.methods.append(f"quantization-aware training ({_describe(stage.config) or 'default scheme'})")
    return None, callbacks


def _structured_prune(run: _Run, fields: Mapping[str, Any]) -> None:
    from ..pruning.structured import StructuredPruningConfig, structured_prune_

    cfg = StructuredPruningConfig(**fields)
    calibration = None
    if cfg.importance == "activation" or cfg.layer_importance == "block_influence":
        calibration = run.calibration_batches()
    structured_prune_(run.model, cfg, calibration)
    run.methods.append(f"structured pruning ({_describe(fields)})")


def _train(run: _Run, stage: Stage, folder: Path, callbacks: list[Any]):
    """The stage's Trainer run: `DistillationTrainer` against the teacher for distillation, `Trainer` otherwise."""
    import torch
    from transformers import Trainer

    from ..distillation import DistillationTrainer
    from ..reporting import CompressionReportCallback

    cls = _training_class(stage)
    defaults = {"report_to": "none", "save_strategy": "no", "use_cpu": not torch.cuda.is_available()}
    args = cls(output_dir=str(folder), **{**defaults, **stage.args})
    callbacks.append(CompressionReportCallback(list(run.methods)))
    common = {
        "model": run.model,
        "args": args,
        "train_dataset": run.train_set,
        "data_collator": run.collator,
        "processing_class": run.tokenizer,
        "callbacks": callbacks,
    }
    if not hasattr(args, "temperature"):
        trainer = Trainer(**common)
    else:
        if run.teacher is None:
            raise ValueError(f"{stage.label}: no teacher to distill from.")
        trainer = DistillationTrainer(teacher_model=run.teacher, **common)
    trainer.train()
    return trainer.model


def _write_report(report, folder: Path, extra: Mapping[str, Any] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    report.to_json(folder / "report.json")
    if extra:
        data = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        data.update(extra)
        (folder / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(report.to_markdown() + "\n", encoding="utf-8")


def check_recipe_output(recipe: Recipe) -> None:
    """Refuse (`FileExistsError`, nothing touched) to run a recipe over stage folders or report files of an earlier
    run unless the recipe says `overwrite: true`."""
    root = Path(recipe.output_dir)
    folders = recipe.stage_dirs()
    existing = [str(p) for p in folders.values() if p.exists() and (not p.is_dir() or any(p.iterdir()))]
    existing += [str(p) for p in library_files(root, REPORT_FILES)]
    if existing and not recipe.overwrite:
        raise FileExistsError(
            f"stage folders / report files {existing} already exist; set overwrite: true (or --overwrite) to replace "
            "what hf_compress wrote there (other files are kept), or choose another output_dir."
        )


def _prepare_output(recipe: Recipe, folders: Mapping[str, Path]) -> None:
    """Check every folder and file the recipe writes before the first stage runs; with `overwrite`, remove only what
    hf_compress wrote there (see `hf_compress.utils.output`), never the user's other files."""
    check_recipe_output(recipe)
    if not recipe.overwrite:
        return
    root = Path(recipe.output_dir)
    for stage in recipe.stages:
        folder = check_output_dir(folders[stage.name], recipe.overwrite, f"output_dir/{stage.folder_name}")
        if stage.type == "qat":  # the qat stage writes two models below its folder
            for sub in ("float", "quantized"):
                clear_library_files(folder / sub, _STAGE_FILES)
                if (folder / sub).is_dir() and not any((folder / sub).iterdir()):
                    (folder / sub).rmdir()
        clear_library_files(folder, _STAGE_FILES)
    clear_library_files(root, REPORT_FILES)


def _row_figures(row) -> dict[str, Any]:
    return {
        "parameters": row.parameters,
        "nonzero_parameters": row.nonzero_parameters,
        "sparsity": row.sparsity,
        "size_mb": row.disk_mb,
        "bits_per_parameter": row.bits_per_parameter,
        **row.metrics,
    }


def _describe(values: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (values or {}).items())


__all__ = ["check_recipe_output", "run_recipe"]
