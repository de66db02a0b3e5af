"""What a recipe is: [`Recipe`] and its [`Stage`]s, read and validated by [`load_recipe`] before anything runs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..errors import RecipeError, UnavailableError
from .fields import _check_fields, _dataclass_hints, _did_you_mean, _signature_hints

logger = logging.get_logger(__name__)


STAGE_TYPES = ("finetune", "distill", "prune", "structured_prune", "quantize", "qat")
# Stage keys every stage accepts, and the keys per stage type.
_COMMON_STAGE_KEYS = {"type", "name", "report_name"}
_STAGE_KEYS = {
    "finetune": {"args", "distill_from_teacher"},
    "distill": {"student", "args"},
    "prune": {"structured", "config", "args", "distill_from_teacher"},
    "structured_prune": {"config", "args", "distill_from_teacher"},
    "quantize": {"config", "storage_dtype"},
    "qat": {"config", "args", "distill_from_teacher"},
}
_TOP_LEVEL_KEYS = {"model", "teacher", "tokenizer", "dataset", "output_dir", "overwrite", "report", "stages", "task"}
TASKS = ("sequence-classification", "causal-lm")  # any spelling normalize_task accepts ("classification", ...)
_DATASET_KEYS = {
    "name",
    "path",
    "hub",
    "text_dir",
    "block_size",
    "max_train_tokens",
    "max_eval_tokens",
    "calibration_batches",
    "text_column",
    "label_column",
    "max_length",
    "max_examples",
    "seed",
    "train_split",
    "eval_split",
}
_REPORT_KEYS = {"batch_size", "max_eval_batches", "latency_batches", "warmup", "include_input"}


# ----------------------------------------------------------------------------------------------------------------
# the recipe


@dataclass
class Stage:
    """One stage of a [`Recipe`]: its type, folder name and the fields of the library config it maps onto."""

    type: str
    name: str
    index: int
    student: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] | None = None
    distill_from_teacher: bool = False
    storage_dtype: str | None = None
    structured: dict[str, Any] = field(default_factory=dict)
    report_name: str | None = None

    @property
    def row_name(self) -> str:
        """The stage's row in the report."""
        return self.report_name or self.name

    @property
    def label(self) -> str:
        return f"stage {self.index} ({self.name!r}, type {self.type!r})"

    @property
    def folder_name(self) -> str:
        return f"{self.index + 1}_{self.name}"


@dataclass
class Recipe:
    """A validated recipe; build it with [`load_recipe`] (from a file or a dict) and run it with [`run_recipe`].

    Args:
        model (`str`): input model folder or hub name.
        stages (`list[Stage]`): the stages, in order.
        output_dir (`str`): folder of the stage outputs.
        dataset (`dict`): `name: phishing` (embedded), `path: file.csv` or `hub: name`, plus `text_column`,
            `label_column`, `max_length`, `max_examples`, `seed`, `train_split`, `eval_split`.
        teacher (`str`, *optional*): teacher of `distill` stages (default: `model`).
        tokenizer (`str`, *optional*): tokenizer folder or name (default: `model`).
        overwrite (`bool`): replace existing stage folders.
        report (`dict`): [`compression_report`] settings: `batch_size`, `max_eval_batches`, `latency_batches`, `warmup`;
            `include_input: false` leaves the input model out of the table (its first row is then the first stage).
        task (`str`): `"sequence-classification"` (default; also `"classification"`, `"text-classification"`; accuracy / F1) or `"causal-lm"` (perplexity; the dataset is then
            `text_dir: <folder with train.txt and test.txt>` cut into `block_size` token blocks, with optional
            `max_train_tokens`, `max_eval_tokens`, `calibration_batches`; see [`~hf_compress.recipes.load_text_blocks`]).

    >>> recipe = load_recipe({"model": "teacher", "output_dir": "out", "stages": [{"type": "quantize"}]})
    >>> recipe.stages[0].folder_name
    '1_quantize'
    """

    model: str
    stages: list[Stage]
    output_dir: str
    dataset: dict[str, Any] = field(default_factory=lambda: {"name": "phishing"})
    teacher: str | None = None
    tokenizer: str | None = None
    overwrite: bool = False
    report: dict[str, Any] = field(default_factory=dict)
    task: str = "sequence-classification"

    def stage_dirs(self) -> dict[str, Path]:
        return {s.name: Path(self.output_dir) / s.folder_name for s in self.stages}


def _training_class(stage: Stage):
    from transformers import TrainingArguments

    if stage.type == "distill" or stage.distill_from_teacher:
        from ..distillation import DistillationConfig

        return DistillationConfig
    return TrainingArguments


def _validate_stage(stage: Stage, output_dir: str) -> None:
    """Type-check every field, then build every config so its own bound checks run now."""
    where = stage.label
    if stage.type == "distill":
        from ..distillation.student import create_student

        _check_fields(where, "student", stage.student, _signature_hints(create_student))
    elif stage.type in ("prune", "structured_prune"):
        from ..pruning import PruningConfig
        from ..pruning.structured import StructuredPruningConfig

        if stage.structured:
            _check_fields(where, "structured", stage.structured, _dataclass_hints(StructuredPruningConfig))
            _build(where, "structured", lambda: StructuredPruningConfig(**stage.structured))
        cls = PruningConfig if stage.type == "prune" else StructuredPruningConfig
        _check_fields(where, "config", stage.config, _dataclass_hints(cls))
        _build(where, "config", lambda: cls(**stage.config))
    elif stage.type == "quantize":
        from ..quantization.ptq import build_quantization_config, quantize_model

        hints = _signature_hints(quantize_model)
        hints.pop("device_map", None)
        _check_fields(where, "config", stage.config, hints)
        keys = ("method", "llm_int8_threshold", "group_size", "compute_dtype", "double_quant")
        kwargs = {k: v for k, v in stage.config.items() if k in keys}
        _build(where, "config", lambda: build_quantization_config(kwargs.pop("method", "nf4"), **kwargs))
    elif stage.type == "qat":
        from ..quantization import QATCallback, QATConfig

        hints = _signature_hints(QATCallback.__init__)
        hints.pop("save_quantized", None)
        _check_fields(where, "config", stage.config, hints)
        qat_keys = {f.name for f in dataclasses.fields(QATConfig)}
        _build(where, "config", lambda: QATConfig(**{k: v for k, v in stage.config.items() if k in qat_keys}))
        # the callback's own checks too (start_step an integer >= 0), now rather than when the stage starts
        _build(where, "config", lambda: QATCallback(**stage.config, save_quantized=False))
        if stage.args is None:
            raise RecipeError(f"{where}: field 'args' is required: quantization-aware training is a Trainer run.")
    if stage.args is not None:
        cls = _training_class(stage)
        hints = _dataclass_hints(cls)
        hints.pop("output_dir", None)
        _check_fields(where, "args", stage.args, hints)
        args = _build(where, "args", lambda: cls(output_dir=output_dir, **stage.args))
        if args.max_steps > 0:  # epoch-based runs are checked once the data is loaded (check_stage_steps)
            check_stage_steps(stage, args.max_steps)


def training_steps(args: Any, num_train_examples: int) -> int:
    """Optimizer steps of a Trainer run with `args` over `num_train_examples` (as `Trainer` computes them)."""
    if args.max_steps > 0:
        return int(args.max_steps)
    batches = math.ceil(num_train_examples / max(1, args.train_batch_size * args.world_size))
    per_epoch = max(
        batches // args.gradient_accumulation_steps + int(batches % args.gradient_accumulation_steps > 0), 1
    )
    return math.ceil(args.num_train_epochs * per_epoch)


def check_stage_steps(stage: Stage, steps: int) -> None:
    """Schedule bounds against the stage's run length: a QAT `start_step` at or after the last step, or a pruning
    schedule starting after it, is a `RecipeError`; a pruning schedule ending after it is a warning that names the
    sparsity the run will reach. Checked before the first stage runs."""
    if stage.type == "qat":
        start = stage.config.get("start_step", 0)
        if isinstance(start, int) and start >= steps:
            raise RecipeError(
                f"{stage.label}: field config.start_step={start} is not allowed: the stage trains {steps} optimizer "
                "steps, so fake quantization would never be trained; it must be smaller. Lower start_step or train "
                "longer (args.num_train_epochs / max_steps)."
            )
    elif stage.type == "prune" and stage.args is not None:
        from ..pruning import PruningConfig
        from ..pruning.schedule import schedule_shortfall

        config = PruningConfig(**stage.config)
        if config.start_step > steps:
            raise RecipeError(
                f"{stage.label}: field config.start_step={config.start_step} is after the stage's last step ({steps} "
                "optimizer steps): the model would never be pruned."
            )
        shortfall = schedule_shortfall(config, steps)
        if shortfall is not None:
            last, reached_at, reached = shortfall
            logger.warning(
                f"{stage.label}: config.end_step={last} is after the stage's last step ({steps} optimizer steps): "
                f"the schedule stops at step {reached_at} with sparsity {reached:.3f} instead of "
                f"{config.target_sparsity:.3f}. Lower end_step or train longer."
            )


def _build(where: str, section: str, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{where}: field {section!r}: {err}") from err


def load_recipe(
    source: str | os.PathLike | Mapping[str, Any], *, check_models: bool = True, **overrides: Any
) -> Recipe:
    """Read (YAML or JSON file, or a dict) and validate a whole recipe; nothing is trained or written.

    Args:
        source (`str`, `os.PathLike` or `dict`): the recipe file or its content.
        check_models (`bool`, *optional*, defaults to `True`): check now that `model`, `teacher` and `tokenizer` are
            saved folders or reachable Hub names (`run_recipe` checks again before the first stage; the demo, which
            writes its input model after validating the recipe, passes `False`).
        overrides: top-level fields replacing the file's (e.g. `output_dir=...`, `overwrite=True`); `None` values
            are ignored. Relative paths given here are relative to the working directory.

    Relative paths in a recipe file (`model`, `teacher`, `tokenizer`, `dataset.path`) are resolved against the
    file's folder, so a recipe runs the same from any working directory; `output_dir` is relative to the working
    directory (where the command runs), like `--output_dir`.

    Raises:
        `RecipeError` (a `ValueError`): an unknown stage type, unknown field or wrongly typed value, or a value a
            config rejects, naming the stage (index and name) and the field.
    """
    data = _read_recipe(source)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    data.update(overrides)
    dataset, report = _check_top_level(data)
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise RecipeError("recipe: field 'stages' must be a non-empty list of stages.")
    stages: list[Stage] = []
    for index, raw in enumerate(raw_stages):
        stage = _parse_stage(index, raw, {s.name for s in stages})
        quantized = [s for s in stages if s.type in ("quantize", "qat")]
        if quantized:
            raise RecipeError(
                f"{stage.label}: comes after the quantization stage {quantized[0].index}; quantization must be the "
                "last stage."
            )
        stages.append(stage)
    if any(s.distill_from_teacher for s in stages) and not any(s.type == "distill" for s in stages):
        if not data.get("teacher"):
            bad = next(s for s in stages if s.distill_from_teacher)
            raise RecipeError(
                f"{bad.label}: field 'distill_from_teacher' needs a teacher: a 'distill' stage before it or a "
                "top-level 'teacher'."
            )
    recipe = Recipe(
        model=data["model"],
        stages=stages,
        output_dir=data["output_dir"],
        dataset=dict(dataset),
        teacher=data.get("teacher"),
        tokenizer=data.get("tokenizer"),
        overwrite=data.get("overwrite", False),
        report=dict(report),
        task=_recipe_task(data),
    )
    for stage in stages:
        _validate_stage(stage, str(Path(recipe.output_dir) / stage.folder_name))
        if stage.distill_from_teacher and not any(s.type == "distill" for s in stages[: stage.index]):
            if not recipe.teacher:
                raise RecipeError(f"{stage.label}: field 'distill_from_teacher' needs an earlier 'distill' stage.")
    # last, as it may ask the Hub about a name: the input paths (relative to the recipe file) and their models
    base_dir = None if isinstance(source, Mapping) else Path(source).resolve().parent
    inputs = _resolve_inputs(data, base_dir, set(overrides), check_models)
    recipe.model, recipe.teacher, recipe.tokenizer = inputs["model"], inputs.get("teacher"), inputs.get("tokenizer")
    recipe.dataset = dict(inputs.get("dataset") or recipe.dataset)
    return recipe


def _read_recipe(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"recipe: no file at {str(path)!r}.")
    with path.open(
        encoding="utf-8"
    ) as stream:  # a named stream: YAML errors then name the file, not "<unicode string>"
        if path.suffix == ".json":
            try:
                data = json.load(stream)
            except json.JSONDecodeError as err:
                raise RecipeError(
                    f"recipe: {str(path)!r} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}."
                ) from None
        else:
            import yaml

            try:
                data = yaml.safe_load(stream)
            except yaml.YAMLError as err:
                raise RecipeError(f"recipe: {str(path)!r} is not valid YAML:\n{err}") from None
    if not isinstance(data, Mapping):
        raise RecipeError(f"recipe: {str(path)!r} must hold a mapping with 'model', 'output_dir' and 'stages'.")
    return dict(data)


def _resolve_inputs(
    data: dict[str, Any], base_dir: Path | None, overridden: set[str], check_models: bool
) -> dict[str, Any]:
    """`model`, `teacher`, `tokenizer` and `dataset.path`: relative paths from the file are taken relative to its
    folder (`base_dir`); with `check_models`, a model that is neither a saved folder nor a reachable Hub name fails
    now (not after the Hub client's retries, nor after earlier stages trained)."""
    data = dict(data)
    for key in ("model", "teacher", "tokenizer"):
        if data.get(key):
            base = None if key in overridden else base_dir
            data[key] = resolve_recipe_model(data[key], key, base, check=check_models)
    dataset = data.get("dataset")
    if isinstance(dataset, Mapping) and isinstance(dataset.get("path"), str):
        path = Path(dataset["path"]).expanduser()
        path = path if path.is_absolute() or base_dir is None or "dataset" in overridden else base_dir / path
        if not path.is_file():
            where = f" (relative paths are resolved against {str(base_dir)!r})" if base_dir is not None else ""
            raise RecipeError(f"recipe: field dataset.path={dataset['path']!r}: no file at {str(path)!r}{where}.")
        data["dataset"] = {**dataset, "path": str(path)}
    if isinstance(dataset, Mapping) and isinstance(dataset.get("text_dir"), str):
        folder = Path(dataset["text_dir"]).expanduser()
        if not folder.is_absolute() and base_dir is not None and "dataset" not in overridden:
            folder = Path(os.path.normpath(base_dir / folder))
        if not folder.is_dir():
            where = f" (relative paths are resolved against {str(base_dir)!r})" if base_dir is not None else ""
            raise RecipeError(
                f"recipe: field dataset.text_dir={dataset['text_dir']!r}: no folder at {str(folder)!r}{where}."
            )
        data["dataset"] = {**data.get("dataset", dataset), "text_dir": str(folder)}
    return data


def resolve_recipe_model(value: str, key: str, base_dir: Path | None, check: bool = True) -> str:
    """A recipe's model field as a local folder (relative to `base_dir`) or Hub name; with `check`, a missing folder or
    unknown name is a `RecipeError` / `UnavailableError` now."""
    from ..utils.model_path import resolve_model_source

    if not check:
        candidate = Path(value).expanduser()
        if base_dir is not None and not candidate.is_absolute() and (base_dir / candidate).exists():
            return str(base_dir / candidate)
        return value
    try:
        return resolve_model_source(value, key, base_dir=base_dir)
    except FileNotFoundError as err:
        raise RecipeError(f"recipe: {err}") from None
    except UnavailableError as err:
        raise UnavailableError(f"recipe: {err}") from None


# dataset field -> (check, what is allowed)
_DATASET_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "path": (lambda v: isinstance(v, str) and bool(v), "a CSV file path"),
    "hub": (lambda v: isinstance(v, str) and bool(v), "a Hub dataset name"),
    "text_column": (lambda v: isinstance(v, str) and bool(v), "a column name"),
    "label_column": (lambda v: isinstance(v, str) and bool(v), "a column name"),
    "train_split": (lambda v: isinstance(v, str) and bool(v), "a split name"),
    "eval_split": (lambda v: isinstance(v, str) and bool(v), "a split name"),
    "max_length": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "an integer > 0"),
    "max_examples": (
        lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
        "an integer > 0",
    ),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "text_dir": (lambda v: isinstance(v, str) and bool(v), "a folder path"),
    "block_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "an integer > 0"),
    "max_train_tokens": (
        lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
        "an integer > 0",
    ),
    "max_eval_tokens": (
        lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
        "an integer > 0",
    ),
}


def _recipe_task(data: Mapping[str, Any]) -> str:
    from ..utils.tasks import normalize_task

    try:
        return normalize_task(data.get("task", "sequence-classification"), TASKS, argument="recipe: field 'task'")
    except ValueError as err:
        raise RecipeError(str(err)) from None


def _check_top_level(data: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """Check the top-level fields; returns the dataset and report settings."""
    unknown = set(data) - _TOP_LEVEL_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise RecipeError(
            f"recipe: unknown field {key!r}; allowed: {sorted(_TOP_LEVEL_KEYS)}." + _did_you_mean(key, _TOP_LEVEL_KEYS)
        )
    for key in ("model", "output_dir"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise RecipeError(f"recipe: field {key!r} is required and must be a string, got {data.get(key)!r}.")
    for key in ("teacher", "tokenizer"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise RecipeError(f"recipe: field {key!r} must be a string, got {data[key]!r}.")
    if not isinstance(data.get("overwrite", False), bool):
        raise RecipeError(f"recipe: field 'overwrite' must be true or false, got {data['overwrite']!r}.")
    dataset = data.get("dataset") or {"name": "phishing"}
    if not isinstance(dataset, Mapping):
        raise RecipeError(f"recipe: field 'dataset' must be a mapping, got {dataset!r}.")
    for key in dataset:
        if key not in _DATASET_KEYS:
            raise RecipeError(
                f"recipe: unknown field dataset.{key!r}; allowed: {sorted(_DATASET_KEYS)}."
                + _did_you_mean(key, _DATASET_KEYS)
            )
    task = _recipe_task(data)
    if task == "causal-lm":
        if "text_dir" not in dataset:
            raise RecipeError("recipe: task 'causal-lm' needs dataset.text_dir (a folder with train.txt, test.txt).")
    elif sum(k in dataset for k in ("name", "path", "hub")) != 1:
        raise RecipeError("recipe: field 'dataset' needs exactly one of 'name' (phishing), 'path' or 'hub'.")
    if "name" in dataset and dataset["name"] != "phishing":
        raise RecipeError(f"recipe: dataset.name={dataset['name']!r}; the embedded dataset is 'phishing'.")
    for key, value in dataset.items():
        check, allowed = _DATASET_FIELD_TYPES.get(key, (None, ""))
        if check is not None and not check(value):
            raise RecipeError(f"recipe: field dataset.{key}={value!r} is not allowed: it must be {allowed}.")
    if "hub" not in dataset and ("text_column" in dataset or "label_column" in dataset):
        raise RecipeError(
            "recipe: dataset.text_column / label_column apply to 'hub' datasets; the embedded phishing data and "
            "'path' CSVs (columns url,label) give the columns 'text' and 'label'."
        )
    report = data.get("report") or {}
    if not isinstance(report, Mapping) or any(k not in _REPORT_KEYS for k in report):
        raise RecipeError(f"recipe: field 'report' accepts {sorted(_REPORT_KEYS)}, got {report!r}.")
    if not isinstance(report.get("include_input", True), bool):
        raise RecipeError(
            f"recipe: field report.include_input must be true or false, got {report['include_input']!r}."
        )
    return dataset, report


def _parse_stage(index: int, raw: Any, names: set[str]) -> Stage:
    """One stage from its mapping: type, name and the fields its type accepts (values are checked later)."""
    if not isinstance(raw, Mapping):
        raise RecipeError(f"stage {index}: must be a mapping with a 'type', got {raw!r}.")
    stage_type = raw.get("type")
    name = raw.get("name", stage_type)
    where = f"stage {index} ({name!r})"
    if stage_type not in STAGE_TYPES:
        raise RecipeError(
            f"{where}: unknown stage type {stage_type!r}; allowed: {list(STAGE_TYPES)}."
            + _did_you_mean(stage_type, STAGE_TYPES)
        )
    if not isinstance(name, str) or not name or "/" in name or name in names:
        raise RecipeError(f"{where}: field 'name' must be a unique folder-safe string, got {name!r}.")
    allowed = _COMMON_STAGE_KEYS | _STAGE_KEYS[stage_type]
    for key in raw:
        if key not in allowed:
            raise RecipeError(
                f"stage {index} ({name!r}, type {stage_type!r}): unknown field {key!r}; allowed: {sorted(allowed)}."
                + _did_you_mean(key, allowed)
            )
    for section in ("student", "config", "args", "structured"):
        if raw.get(section) is not None and not isinstance(raw[section], Mapping):
            label = f"stage {index} ({name!r}, type {stage_type!r})"
            raise RecipeError(f"{label}: field {section!r} must be a mapping, got {raw[section]!r}.")
    stage = Stage(
        type=stage_type,
        name=name,
        index=index,
        student=dict(raw.get("student") or {}),
        config=dict(raw.get("config") or {}),
        args=dict(raw["args"]) if raw.get("args") is not None else None,
        distill_from_teacher=raw.get("distill_from_teacher", False),
        storage_dtype=raw.get("storage_dtype"),
        structured=dict(raw.get("structured") or {}),
        report_name=raw.get("report_name"),
    )
    if stage.storage_dtype not in (None, "float32", "bfloat16", "float16"):
        raise RecipeError(
            f"{stage.label}: field 'storage_dtype'={stage.storage_dtype!r}; allowed: float32, bfloat16, float16 "
            "(dtype of the weights the quantization leaves unquantized: embeddings, norms, skipped layers)."
        )
    if not isinstance(stage.distill_from_teacher, bool):
        raise RecipeError(f"{stage.label}: field 'distill_from_teacher' must be true or false.")
    if stage.report_name is not None and (not isinstance(stage.report_name, str) or not stage.report_name):
        raise RecipeError(f"{stage.label}: field 'report_name' must be a non-empty string, got {stage.report_name!r}.")
    if stage.type == "distill" and stage.args is None:
        stage.args = {}
    return stage


__all__ = ["Recipe", "STAGE_TYPES", "Stage", "check_stage_steps", "load_recipe", "training_steps"]
