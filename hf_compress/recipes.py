"""Recipes: a YAML/JSON file that chains compression stages on one model, each a Trainer run or a one-shot step.

A recipe names a model (a saved folder or hub name), a dataset and a list of stages; every stage writes its own
folder under `output_dir` and a compression report (the stage's model next to the input model and the earlier
stages). The whole recipe is validated before the first stage runs.

```yaml
model: out/teacher                 # the input model (the teacher of a `distill` stage)
dataset: {name: phishing}          # or {path: urls.csv}, or {hub: shawhin/phishing-site-classification}
output_dir: out/recipe
stages:
  - type: distill                  # DistillationTrainer into create_student(model, **student)
    student: {num_layers: 2, num_heads: 2}
    args: {num_train_epochs: 2, temperature: 2.0, alpha: 0.5, learning_rate: 1.0e-3}
  - type: structured_prune         # structured_prune_(model, StructuredPruningConfig(**config)), then optional fine-tune
    config: {ffn_pruning_ratio: 0.5}
  - type: prune                    # PruningCallback(PruningConfig(**config)) during a fine-tune (args), or one-shot
    config: {sparsity: 0.3, schedule: cubic, end_step: 100}
    args: {num_train_epochs: 1}
    distill_from_teacher: true     # fine-tune with DistillationTrainer against the distill stage's teacher
  - type: quantize                 # quantize_model(model, **config)
    config: {method: nf4, double_quant: true}
```
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import json
import os
import shutil
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

STAGE_TYPES = ("distill", "prune", "structured_prune", "quantize", "qat")
# Stage keys every stage accepts, and the keys per stage type.
_COMMON_STAGE_KEYS = {"type", "name"}
_STAGE_KEYS = {
    "distill": {"student", "args"},
    "prune": {"config", "args", "distill_from_teacher"},
    "structured_prune": {"config", "args", "distill_from_teacher"},
    "quantize": {"config", "storage_dtype"},
    "qat": {"config", "args", "distill_from_teacher"},
}
_TOP_LEVEL_KEYS = {"model", "teacher", "tokenizer", "dataset", "output_dir", "overwrite", "report", "stages", "task"}
TASKS = ("classification", "causal-lm")
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
_REPORT_KEYS = {"batch_size", "max_eval_batches", "latency_batches", "warmup"}
# Arguments of the library functions that the runner fills in itself.
_RUNNER_ARGUMENTS = {
    "teacher",
    "model_or_path",
    "output_dir",
    "processing_class",
    "overwrite",
    "teacher_model_init_kwargs",
    "model_class",
}


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the stage (index and name) and the field."""


def _did_you_mean(value: str, allowed) -> str:
    close = difflib.get_close_matches(str(value), sorted(allowed), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


# ----------------------------------------------------------------------------------------------------------------
# type checking of field values against annotations


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML/JSON value fits a type annotation (loosely: unknown constructs are accepted)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple, set, typing.Sequence, typing.MutableSequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(hint)
        return not args or all(_matches(v, args[0]) for v in value) if origin is not tuple else True
    if origin in (dict, typing.Mapping) or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        if issubclass(hint, enum.Enum):
            return isinstance(value, hint) or value in {m.value for m in hint} or value in hint.__members__
        if hint is bool:
            return isinstance(value, bool)
        if hint is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if hint is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if hint is str:
            return isinstance(value, str)
        if hint.__module__ == "torch" or hint.__module__.startswith("torch."):
            return True  # e.g. torch.dtype given as a string
        return isinstance(value, hint) or isinstance(value, (str, dict))
    return True


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__


def _dataclass_hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type of an (init) dataclass field; new config fields are picked up automatically."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: fall back to no type check
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def _signature_hints(fn: Callable) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    params = inspect.signature(fn).parameters
    return {
        name: hints.get(name, Any)
        for name, p in params.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in _RUNNER_ARGUMENTS and name != "self"
    }


def _check_fields(where: str, section: str, values: Any, hints: Mapping[str, Any]) -> None:
    if values is None:
        return
    if not isinstance(values, Mapping):
        raise RecipeError(
            f"{where}: field {section!r} must be a mapping of field: value, got {type(values).__name__}."
        )
    for key, value in values.items():
        if key not in hints:
            raise RecipeError(
                f"{where}: unknown field {section}.{key!r}; allowed: {sorted(hints)}." + _did_you_mean(key, hints)
            )
        if not _matches(value, hints[key]):
            raise RecipeError(
                f"{where}: field {section}.{key} has the wrong type: got {value!r} ({type(value).__name__}), "
                f"expected {_type_name(hints[key])}."
            )


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
        report (`dict`): [`compression_report`] settings: `batch_size`, `max_eval_batches`, `latency_batches`, `warmup`.
        task (`str`): `"classification"` (default; accuracy / F1) or `"causal-lm"` (perplexity; the dataset is then
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
    task: str = "classification"

    def stage_dirs(self) -> dict[str, Path]:
        return {s.name: Path(self.output_dir) / s.folder_name for s in self.stages}


def _training_class(stage: Stage):
    from transformers import TrainingArguments

    if stage.type == "distill" or stage.distill_from_teacher:
        from .distillation import DistillationConfig

        return DistillationConfig
    return TrainingArguments


def _validate_stage(stage: Stage, output_dir: str) -> None:
    """Type-check every field, then build every config so its own bound checks run now."""
    where = stage.label
    if stage.type == "distill":
        from .distillation.student import create_student

        _check_fields(where, "student", stage.student, _signature_hints(create_student))
    elif stage.type == "prune":
        from .pruning import PruningConfig

        _check_fields(where, "config", stage.config, _dataclass_hints(PruningConfig))
        _build(where, "config", lambda: PruningConfig(**stage.config))
    elif stage.type == "structured_prune":
        from .pruning.structured import StructuredPruningConfig

        _check_fields(where, "config", stage.config, _dataclass_hints(StructuredPruningConfig))
        _build(where, "config", lambda: StructuredPruningConfig(**stage.config))
    elif stage.type == "quantize":
        from .quantization.ptq import build_quantization_config, quantize_model

        hints = _signature_hints(quantize_model)
        hints.pop("device_map", None)
        _check_fields(where, "config", stage.config, hints)
        keys = ("method", "llm_int8_threshold", "group_size", "compute_dtype", "double_quant")
        kwargs = {k: v for k, v in stage.config.items() if k in keys}
        _build(where, "config", lambda: build_quantization_config(kwargs.pop("method", "nf4"), **kwargs))
    elif stage.type == "qat":
        from .quantization import QATCallback, QATConfig

        hints = _signature_hints(QATCallback.__init__)
        hints.pop("save_quantized", None)
        _check_fields(where, "config", stage.config, hints)
        qat_keys = {f.name for f in dataclasses.fields(QATConfig)}
        _build(where, "config", lambda: QATConfig(**{k: v for k, v in stage.config.items() if k in qat_keys}))
        if stage.args is None:
            raise RecipeError(f"{where}: field 'args' is required: quantization-aware training is a Trainer run.")
    if stage.args is not None:
        cls = _training_class(stage)
        hints = _dataclass_hints(cls)
        hints.pop("output_dir", None)
        _check_fields(where, "args", stage.args, hints)
        _build(where, "args", lambda: cls(output_dir=output_dir, **stage.args))


def _build(where: str, section: str, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{where}: field {section!r}: {err}") from err


def load_recipe(source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> Recipe:
    """Read (YAML or JSON file, or a dict) and validate a whole recipe; nothing is trained or written.

    Args:
        source (`str`, `os.PathLike` or `dict`): the recipe file or its content.
        overrides: top-level fields replacing the file's (e.g. `output_dir=...`, `overwrite=True`); `None` values
            are ignored.

    Raises:
        `RecipeError` (a `ValueError`): an unknown stage type, unknown field or wrongly typed value, or a value a
            config rejects, naming the stage (index and name) and the field.
    """
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"recipe: no file at {str(path)!r}.")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
        if not isinstance(data, Mapping):
            raise RecipeError(f"recipe: {str(path)!r} must hold a mapping with 'model', 'output_dir' and 'stages'.")
        data = dict(data)
    data.update({k: v for k, v in overrides.items() if v is not None})
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
    task = data.get("task", "classification")
    if task not in TASKS:
        raise RecipeError(f"recipe: field 'task'={task!r}; allowed: {list(TASKS)}." + _did_you_mean(task, TASKS))
    if task == "causal-lm":
        if "text_dir" not in dataset:
            raise RecipeError("recipe: task 'causal-lm' needs dataset.text_dir (a folder with train.txt, test.txt).")
    elif sum(k in dataset for k in ("name", "path", "hub")) != 1:
        raise RecipeError("recipe: field 'dataset' needs exactly one of 'name' (phishing), 'path' or 'hub'.")
    if "name" in dataset and dataset["name"] != "phishing":
        raise RecipeError(f"recipe: dataset.name={dataset['name']!r}; the embedded dataset is 'phishing'.")
    report = data.get("report") or {}
    if not isinstance(report, Mapping) or any(k not in _REPORT_KEYS for k in report):
        raise RecipeError(f"recipe: field 'report' accepts {sorted(_REPORT_KEYS)}, got {report!r}.")
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise RecipeError("recipe: field 'stages' must be a non-empty list of stages.")

    stages: list[Stage] = []
    names: set[str] = set()
    quantized_at: int | None = None
    for index, raw in enumerate(raw_stages):
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
        names.add(name)
        allowed = _COMMON_STAGE_KEYS | _STAGE_KEYS[stage_type]
        for key in raw:
            if key not in allowed:
                raise RecipeError(
                    f"stage {index} ({name!r}, type {stage_type!r}): unknown field {key!r}; allowed: {sorted(allowed)}."
                    + _did_you_mean(key, allowed)
                )
        stage = Stage(
            type=stage_type,
            name=name,
            index=index,
            student=dict(raw.get("student") or {}),
            config=dict(raw.get("config") or {}),
            args=dict(raw["args"]) if raw.get("args") is not None else None,
            distill_from_teacher=raw.get("distill_from_teacher", False),
            storage_dtype=raw.get("storage_dtype"),
        )
        if stage.storage_dtype not in (None, "float32", "bfloat16", "float16"):
            raise RecipeError(
                f"{stage.label}: field 'storage_dtype'={stage.storage_dtype!r}; allowed: float32, bfloat16, float16 "
                "(dtype of the weights the quantization leaves unquantized: embeddings, norms, skipped layers)."
            )
        if not isinstance(stage.distill_from_teacher, bool):
            raise RecipeError(f"{stage.label}: field 'distill_from_teacher' must be true or false.")
        for section in ("student", "config", "args"):
            if raw.get(section) is not None and not isinstance(raw[section], Mapping):
                raise RecipeError(f"{stage.label}: field {section!r} must be a mapping, got {raw[section]!r}.")
        if stage.type == "distill" and stage.args is None:
            stage.args = {}
        if quantized_at is not None:
            raise RecipeError(
                f"{stage.label}: comes after the quantization stage {quantized_at}; quantization must be the last stage."
            )
        if stage.type in ("quantize", "qat"):
            quantized_at = index
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
        task=task,
    )
    for stage in stages:
        _validate_stage(stage, str(Path(recipe.output_dir) / stage.folder_name))
        if stage.distill_from_teacher and not any(s.type == "distill" for s in stages[: stage.index]):
            if not recipe.teacher:
                raise RecipeError(f"{stage.label}: field 'distill_from_teacher' needs an earlier 'distill' stage.")
    return recipe


# ----------------------------------------------------------------------------------------------------------------
# running


def _load_data(recipe: Recipe, tokenizer):
    spec = recipe.dataset
    seed = spec.get("seed", 42)
    if "name" in spec or "path" in spec:
        from .data import load_phishing_dataset

        data = load_phishing_dataset(spec.get("path"), seed=seed, max_examples=spec.get("max_examples"))
    else:
        from datasets import load_dataset

        try:
            data = load_dataset(spec["hub"])
        except Exception as err:
            from .demo import UnavailableError

            raise UnavailableError(
                f"dataset.hub={spec['hub']!r} could not be loaded ({type(err).__name__}: {err})."
            ) from err
        if spec.get("max_examples"):
            data = type(data)(
                {k: v.shuffle(seed=seed).select(range(min(len(v), spec["max_examples"]))) for k, v in data.items()}
            )
    text_col, label_col = spec.get("text_column", "text"), spec.get("label_column", "label")
    train_split = spec.get("train_split", "train")
    eval_split = spec.get("eval_split") or ("test" if "test" in data else "validation")
    for split in (train_split, eval_split):
        if split not in data:
            raise ValueError(f"dataset: split {split!r} not found; splits: {list(data)}.")
    max_length = spec.get("max_length", 128)

    def encode(batch):
        enc = tokenizer(batch[text_col], truncation=True, max_length=max_length)
        enc["labels"] = batch[label_col]
        return enc

    encoded = {}
    for split in (train_split, eval_split):
        ds = data[split]
        encoded[split] = ds.map(encode, batched=True, remove_columns=ds.column_names)
    return encoded[train_split], encoded[eval_split]


def load_text_blocks(spec: Mapping[str, Any], tokenizer) -> tuple[list[dict], list[dict]]:
    """Train and evaluation blocks of a causal-LM recipe: `<text_dir>/train.txt` and `<text_dir>/test.txt` (else
    `valid.txt`), each tokenized as one text and cut into non-overlapping `block_size` (default 512) token blocks
    (`input_ids` and `labels`), the first `max_train_tokens` / `max_eval_tokens` tokens of each."""
    import torch

    folder = Path(os.path.expanduser(str(spec["text_dir"])))
    block = int(spec.get("block_size", 512))
    splits = []
    for names, limit in ((("train",), spec.get("max_train_tokens")), (("test", "valid"), spec.get("max_eval_tokens"))):
        path = next((folder / f"{n}.txt" for n in names if (folder / f"{n}.txt").is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"dataset.text_dir: no {' or '.join(n + '.txt' for n in names)} in {str(folder)!r}."
            )
        ids = torch.tensor(tokenizer(path.read_text(encoding="utf-8"))["input_ids"], dtype=torch.long)
        ids = ids[: int(limit)] if limit else ids
        n = ids.numel() // block
        splits.append([{"input_ids": row, "labels": row} for row in ids[: n * block].view(n, block)])
    return splits[0], splits[1]


def _load_model(name_or_path: str):
    import torch

    from .reporting import load_model

    # On the GPU when there is one: the stages train there, and the reports evaluate where the model is.
    model = load_model(os.path.expanduser(name_or_path), device="cuda" if torch.cuda.is_available() else None)
    model.train()
    return model


def run_recipe(recipe: Recipe | str | os.PathLike | Mapping[str, Any], **overrides: Any):
    """Run every stage of a recipe in order; returns the [`~hf_compress.CompressionReport`] after the last stage.

    Each stage writes `output_dir/<n>_<name>/` (the model, its tokenizer, a model card and `report.md` /
    `report.json` with the input model and every stage so far, measured on the evaluation split). An existing
    stage folder is never overwritten unless the recipe (or `overwrite=True`) says so; this is checked for every
    stage before the first one runs.
    """
    import torch
    from transformers import DataCollatorWithPadding, Trainer

    from .distillation import DistillationTrainer
    from .metrics import make_compute_metrics
    from .reporting import CompressionReport, CompressionReportCallback, compression_report, write_model_card

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, **overrides)
    elif overrides:
        raise ValueError("overrides are only applied when the recipe is given as a file or dict.")
    folders = recipe.stage_dirs()
    existing = [str(p) for p in folders.values() if p.is_dir() and any(p.iterdir())]
    if existing and not recipe.overwrite:
        raise FileExistsError(f"stage folders {existing} already exist; set overwrite: true (or --overwrite).")
    for p in folders.values():
        if p.is_dir():
            shutil.rmtree(p)

    from .utils.loading import load_tokenizer

    # a `.gguf` model carries its tokenizer
    tokenizer = load_tokenizer(os.path.expanduser(recipe.tokenizer or recipe.model))
    causal_lm = recipe.task == "causal-lm"
    if causal_lm:
        from transformers import default_data_collator

        train_set, eval_set = load_text_blocks(recipe.dataset, tokenizer)
        collator = default_data_collator
        compute_metrics = None  # compression_report measures perplexity
    else:
        train_set, eval_set = _load_data(recipe, tokenizer)
        collator = DataCollatorWithPadding(tokenizer)
        compute_metrics = make_compute_metrics("classification")
    report_kwargs = {"batch_size": 32, "latency_batches": 3, "warmup": 1, **recipe.report}

    def measure(name: str, model_or_path, methods: list[str]):
        return compression_report(
            {name: model_or_path},
            eval_dataset=eval_set,
            compute_metrics=compute_metrics,
            task="causal-lm" if causal_lm else "classification",
            processing_class=tokenizer,
            data_collator=collator,
            methods={name: methods},
            **report_kwargs,
        ).rows[0]

    model = _load_model(recipe.model)
    teacher = _load_model(recipe.teacher) if recipe.teacher else None
    rows = [measure("input", model, [])]
    methods: list[str] = []
    report = CompressionReport(rows=list(rows), task=recipe.task)
    for stage in recipe.stages:
        folder = folders[stage.name]
        folder.mkdir(parents=True, exist_ok=True)
        logger.info(f"hf_compress recipe: {stage.label} -> {folder}")
        result: Any = None
        callbacks: list[Any] = []
        if stage.type == "distill":
            from .distillation import create_student

            teacher = model
            teacher.eval()
            model = create_student(teacher, **stage.student)
            methods.append(f"distillation into {stage.student or 'a copy'} ({_describe(stage.args)})")
        elif stage.type == "structured_prune":
            from .pruning.structured import StructuredPruningConfig, structured_prune_

            cfg = StructuredPruningConfig(**stage.config)
            calibration = None
            if cfg.importance == "activation" or cfg.layer_importance == "block_influence":
                calibration = _calibration_batches(recipe, train_set, collator)
            structured_prune_(model, cfg, calibration)
            methods.append(f"structured pruning ({_describe(stage.config)})")
        elif stage.type == "prune":
            from .pruning import PruningCallback, PruningConfig, make_pruning_permanent_, prune_

            cfg = PruningConfig(**stage.config)
            calibration = None
            if cfg.requires_calibration:
                calibration = _calibration_batches(recipe, train_set, collator)
            if stage.args is None:
                masks = prune_(model, cfg, calibration_data=calibration) if calibration else prune_(model, cfg)
                make_pruning_permanent_(model, masks if isinstance(masks, dict) else None)
            else:
                callbacks.append(PruningCallback(cfg, calibration_data=calibration))
            methods.append(f"unstructured pruning ({_describe(stage.config)})")
        elif stage.type == "quantize":
            from .quantization import quantize_model

            source = model
            if stage.storage_dtype is not None:
                import copy

                source = copy.deepcopy(model).to(getattr(torch, stage.storage_dtype))
            result = quantize_model(
                source, output_dir=folder, processing_class=tokenizer, overwrite=True, **stage.config
            )
            methods.append(f"post-training quantization ({_describe(stage.config) or 'nf4'})")
        elif stage.type == "qat":
            from .quantization import QATCallback

            callbacks.append(QATCallback(**stage.config, output_dir=str(folder / "quantized"), overwrite=True))
            methods.append(f"quantization-aware training ({_describe(stage.config) or 'default scheme'})")

        if stage.args is not None:
            cls = _training_class(stage)
            defaults = {"report_to": "none", "save_strategy": "no", "use_cpu": not torch.cuda.is_available()}
            args = cls(output_dir=str(folder), **{**defaults, **stage.args})
            callbacks.append(CompressionReportCallback(list(methods)))
            common = {
                "model": model,
                "args": args,
                "train_dataset": train_set,
                "data_collator": collator,
                "processing_class": tokenizer,
                "callbacks": callbacks,
            }
            if cls is Trainer or not hasattr(args, "temperature"):
                trainer = Trainer(**common)
            else:
                if teacher is None:
                    raise ValueError(f"{stage.label}: no teacher to distill from.")
                trainer = DistillationTrainer(teacher_model=teacher, **common)
            trainer.train()
            model = trainer.model
        model.eval()
        if stage.type == "quantize":
            measured = folder
            model = result
        elif stage.type == "qat":
            model.save_pretrained(folder / "float")
            measured = folder / "quantized"
        else:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            measured = folder
        row = measure(stage.name, measured, list(methods))
        rows.append(row)
        write_model_card(folder, _row_figures(row), methods, {"name": "input", "size_mb": rows[0].disk_mb})
        report = CompressionReport(rows=list(rows), task=recipe.task)
        report.to_json(folder / "report.json")
        (folder / "report.md").write_text(report.to_markdown() + "\n", encoding="utf-8")
        logger.info(f"hf_compress recipe: after {stage.label}:\n{report.to_markdown()}")
        model.train() if stage.type not in ("quantize", "qat") else None
    root = Path(recipe.output_dir)
    report.to_json(root / "report.json")
    (root / "report.md").write_text(report.to_markdown() + "\n", encoding="utf-8")
    return report


def _calibration_batches(recipe: Recipe, train_set, collator) -> list:
    """Calibration batches without labels: 4 x 8 training examples, or for causal LMs `dataset.calibration_batches`
    (default 32) single blocks spread over the training text."""
    if recipe.task == "causal-lm":
        count = min(int(recipe.dataset.get("calibration_batches", 32)), len(train_set))
        step = max(len(train_set) // max(count, 1), 1)
        batches = [collator([train_set[i * step]]) for i in range(count)]
    else:
        batches = [collator([train_set[i] for i in range(b * 8, b * 8 + 8)]) for b in range(4)]
    for batch in batches:
        batch.pop("labels", None)
    return batches


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


__all__ = ["STAGE_TYPES", "Recipe", "RecipeError", "Stage", "load_recipe", "run_recipe"]
