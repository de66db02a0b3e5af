"""The compression report: size, sparsity, bits per parameter, latency and task quality of models side by side.

[`compression_report`] measures every model the same way (same batches, same metric function) and returns a
[`CompressionReport`] that renders as a Markdown table, saves JSON and draws a size-vs-quality plot.
[`CompressionReportCallback`] puts the student's size figures into the Trainer logs at evaluation time and into the
model card (README.md) of the saved model.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from .utils import count_parameters, unwrap_model

logger = logging.get_logger(__name__)

TASKS = ("classification", "causal-lm")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MODEL_CARD_BEGIN = "<!-- hf_compress:begin -->"
MODEL_CARD_END = "<!-- hf_compress:end -->"
_MB = 1e6


@dataclass
class ReportRow:
    """The figures of one model in a [`CompressionReport`].

    Args:
        name (`str`): the row's label.
        parameters (`int`): logical parameter count (a 4-bit weight counts once, not per packed byte).
        nonzero_parameters (`int`): parameters that are not exactly zero (packed quantized weights count as non-zero).
        disk_bytes (`int`): bytes of the weight files (safetensors) of the saved model.
        memory_bytes (`int`): bytes of parameters and buffers in memory.
        latency_ms (`float`, *optional*): median forward time of one batch, after warm-up.
        latency_device (`str`, *optional*): where latency was measured.
        metrics (`dict[str, float]`): task metrics (accuracy, precision, recall, f1 or perplexity).
        methods (`list[str]`): compression methods applied, as given by the caller.
    """

    name: str
    parameters: int
    nonzero_parameters: int
    disk_bytes: int
    memory_bytes: int
    latency_ms: float | None = None
    latency_device: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_parameters / self.parameters if self.parameters else 0.0

    @property
    def bits_per_parameter(self) -> float:
        return self.disk_bytes * 8 / self.parameters if self.parameters else float("nan")

    @property
    def disk_mb(self) -> float:
        return self.disk_bytes / _MB

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(sparsity=self.sparsity, bits_per_parameter=self.bits_per_parameter, disk_mb=self.disk_mb)
        return out


@dataclass
class CompressionReport:
    """Rows of figures, one per model; the first row is the reference of the ratio columns.

    Render with `to_markdown()` (or `str(report)`), save with `to_json(path)`, plot with `plot(path)`.

    >>> report = CompressionReport([ReportRow("teacher", 1000, 1000, 4000, 4000), ReportRow("4-bit", 1000, 1000, 500, 500)])
    >>> report.ratios()[1]["size_ratio"]
    8.0
    """

    rows: list[ReportRow]
    task: str | None = None

    def __post_init__(self):
        if not self.rows:
            raise ValueError("rows: a CompressionReport needs at least one row.")

    def __getitem__(self, name: str) -> ReportRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no row named {name!r}; rows: {[r.name for r in self.rows]}")

    @property
    def metric_names(self) -> list[str]:
        names: list[str] = []
        for row in self.rows:
            names += [k for k in row.metrics if k not in names]
        return names

    def ratios(self) -> list[dict[str, float]]:
        """Per row: `size_ratio` (reference bytes / row bytes, "x smaller"), `parameter_ratio`, `speedup`."""
        ref = self.rows[0]
        out = []
        for row in self.rows:
            out.append(
                {
                    "size_ratio": ref.disk_bytes / row.disk_bytes if row.disk_bytes else float("nan"),
                    "parameter_ratio": ref.parameters / row.parameters if row.parameters else float("nan"),
                    "speedup": (ref.latency_ms / row.latency_ms)
                    if ref.latency_ms and row.latency_ms
                    else float("nan"),
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "reference": self.rows[0].name,
            "rows": [{**row.to_dict(), **ratio} for row, ratio in zip(self.rows, self.ratios())],
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The report as JSON; written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2, default=_json_default)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    def to_markdown(self) -> str:
        """A Markdown table: one row per model, ratio columns relative to the first model."""
        metric_names = self.metric_names
        header = ["model", "params", "non-zero", "MB on disk", "x smaller", "bits/param", "MB in memory", "latency ms"]
        header += metric_names
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for row, ratio in zip(self.rows, self.ratios()):
            cells = [
                row.name,
                _human_count(row.parameters),
                f"{_human_count(row.nonzero_parameters)} ({100 * (1 - row.sparsity):.0f}%)",
                f"{row.disk_mb:.2f}",
                f"{ratio['size_ratio']:.1f}x",
                f"{row.bits_per_parameter:.2f}",
                f"{row.memory_bytes / _MB:.2f}",
                f"{row.latency_ms:.1f}" if row.latency_ms is not None else "-",
            ]
            for name in metric_names:
                value = row.metrics.get(name)
                cells.append("-" if value is None else (f"{value:.2f}" if name == "perplexity" else f"{value:.4f}"))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def plot(self, path: str | os.PathLike, metric: str | None = None, title: str | None = None) -> Path:
        """Save a PNG of size on disk (MB, log scale) against `metric` (default: accuracy, or perplexity)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if metric is None:
            preferred = ("accuracy", "f1", "perplexity")
            metric = next((m for m in preferred if m in self.metric_names), None)
            metric = metric or (self.metric_names[0] if self.metric_names else None)
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        xs = [row.disk_mb for row in self.rows]
        if metric is not None:
            ys = [row.metrics.get(metric, float("nan")) for row in self.rows]
            ylabel = metric
        else:  # no task metrics: plot parameters instead
            ys = [row.parameters / 1e6 for row in self.rows]
            ylabel = "parameters (M)"
        ax.plot(xs, ys, "-", color="0.7", zorder=1)
        ax.scatter(xs, ys, s=50, zorder=2)
        for x, y, row in zip(xs, ys, self.rows):
            ax.annotate(row.name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter

        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.margins(x=0.15, y=0.2)
        ax.set_xlabel("size on disk (MB, log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(title or "Model size vs quality")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)


def _human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


# ----------------------------------------------------------------------------------------------------------------
# size figures


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a saved model folder (safetensors, else PyTorch `.bin`), or the file itself."""
    path = Path(path)
    if path.is_file():
        return [path]
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        return safetensors
    return sorted(f for f in path.iterdir() if f.is_file() and f.suffix in WEIGHT_FILE_SUFFIXES)


def disk_bytes(model_or_path: nn.Module | str | os.PathLike) -> int:
    """Bytes of the model's weight files: read from a saved folder, or from a safetensors save into a temporary
    folder when given a module (what `save_pretrained` would write; tokenizer and config files are not counted)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        files = weight_files(model_or_path)
        if not files:
            raise FileNotFoundError(f"model_or_path: no weight file (*.safetensors, *.bin) in {str(model_or_path)!r}.")
        return sum(f.stat().st_size for f in files)
    model = unwrap_model(model_or_path)
    with tempfile.TemporaryDirectory(prefix="hf_compress_report_") as tmp:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            from safetensors.torch import save_model

            save_model(model, os.path.join(tmp, "model.safetensors"))
        return sum(f.stat().st_size for f in weight_files(tmp))


def memory_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers in memory (`get_memory_footprint()` for transformers models)."""
    model = unwrap_model(model)
    if hasattr(model, "get_memory_footprint"):
        return int(model.get_memory_footprint())
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.nelement() * t.element_size()
    return total


def estimated_disk_bytes(model: nn.Module) -> int:
    """Bytes of the state dict's tensors: what a safetensors file holds, less its small JSON header. Cheap, for
    logging during training; [`disk_bytes`] measures the real file."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in unwrap_model(model).state_dict().values():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.data_ptr(), tensor.nelement())
        if key in seen and tensor.data_ptr() != 0:
            continue  # tied weights are saved once
        seen.add(key)
        total += tensor.nelement() * tensor.element_size()
    return total


def size_figures(model: nn.Module, disk: int | None = None) -> dict[str, float]:
    """Parameters, non-zeros, sparsity, size (MB) and bits per parameter of a model (no data needed)."""
    params, nonzero = count_parameters(model)
    disk = estimated_disk_bytes(model) if disk is None else disk
    return {
        "parameters": params,
        "nonzero_parameters": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "size_mb": disk / _MB,
        "bits_per_parameter": disk * 8 / params if params else float("nan"),
    }


# ----------------------------------------------------------------------------------------------------------------
# loading, batches, latency, metrics


def load_model(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Load a saved transformers model with the class named in its config (quantized checkpoints included)."""
    import transformers
    from transformers import AutoConfig, AutoModel

    path = str(path)
    from .utils.loading import is_gguf, load_pretrained

    if is_gguf(path):  # a `.gguf` file: dequantized to an ordinary model (utils/loading.py)
        return load_pretrained(path).to(device or "cpu").eval()
    config = AutoConfig.from_pretrained(path)
    cls = next((getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)), AutoModel)
    kwargs: dict[str, Any] = {}
    if getattr(config, "quantization_config", None) is not None:
        kwargs["device_map"] = (
            str(device) if device is not None else ("cuda:0" if torch.cuda.is_available() else "cpu")
        )
    model = cls.from_pretrained(path, **kwargs)
    if device is not None and "device_map" not in kwargs:
        model.to(device)
    return model.eval()


def infer_report_task(model: nn.Module) -> str | None:
    name = type(unwrap_model(model)).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "classification"
    return None


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(unwrap_model(model).parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _forward_arguments(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(unwrap_model(model).forward).parameters)


def _prepare_batches(
    dataset: Any,
    *,
    processing_class: Any,
    data_collator: Callable | None,
    batch_size: int,
    text_column: str,
    max_length: int | None,
    max_batches: int | None,
) -> list[dict[str, torch.Tensor]]:
    """Collated batches (on CPU) of `dataset`: a datasets.Dataset (tokenized here from `text_column` if it holds raw
    text and a tokenizer is given), or any sequence of feature dicts."""
    from transformers import DataCollatorWithPadding, default_data_collator

    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover
        Dataset = ()  # type: ignore[assignment]

    if isinstance(Dataset, type) and isinstance(dataset, Dataset):
        if "input_ids" not in dataset.column_names:
            if processing_class is None or text_column not in dataset.column_names:
                raise ValueError(
                    f"eval_dataset has no 'input_ids' column; pass a tokenized dataset, or processing_class and a "
                    f"dataset with a {text_column!r} column (columns: {dataset.column_names})."
                )
            dataset = dataset.map(
                lambda b: processing_class(b[text_column], truncation=True, max_length=max_length),
                batched=True,
            )
        if "label" in dataset.column_names and "labels" not in dataset.column_names:
            dataset = dataset.rename_column("label", "labels")
        keep = {"input_ids", "attention_mask", "token_type_ids", "labels"}
        dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
    if data_collator is None:
        data_collator = DataCollatorWithPadding(processing_class) if processing_class is not None else None
        data_collator = data_collator or default_data_collator
    n = len(dataset)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    batches = []
    for start in range(0, n, batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, n))]
        batches.append(data_collator(rows))
    if not batches:
        raise ValueError("eval_dataset is empty.")
    return batches


def _to_device(batch: Mapping[str, Any], device: torch.device, accepted: set[str]) -> dict[str, Any]:
    return {
        k: (v.to(device) if isinstance(v, torch.Tensor) else v)
        for k, v in batch.items()
        if k in accepted or "kwargs" in accepted
    }


@torch.no_grad()
def measure_latency(
    model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], *, warmup: int = 2, repeats: int = 10
) -> float:
    """Median wall time (ms) of one forward pass over `repeats` batches after `warmup` untimed ones (cycling
    through `batches`); CUDA is synchronized around each timed pass."""
    model = unwrap_model(model)
    model.eval()
    device = _model_device(model)
    accepted = _forward_arguments(model)
    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + repeats):
        batch = _to_device(batches[i % len(batches)], device, accepted)
        batch.pop("labels", None)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(**batch)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    task: str,
    compute_metrics: Callable | None = None,
) -> dict[str, float]:
    """Task metrics over `batches`: `compute_metrics(EvalPrediction)` (or accuracy/precision/recall/F1 through
    [`~hf_compress.classification_metrics`]) for classification, perplexity for causal LMs."""
    from transformers import EvalPrediction

    from .metrics import classification_metrics, compute_perplexity

    model = unwrap_model(model)
    model.eval()
    if task == "causal-lm" and compute_metrics is None:
        return {"perplexity": compute_perplexity(model, batches)}
    device = _model_device(model)
    accepted = _forward_arguments(model)
    all_logits, all_labels = [], []
    for batch in batches:
        labels = batch.get("labels")
        inputs = _to_device(batch, device, accepted)
        inputs.pop("labels", None)
        logits = model(**inputs).logits.float().cpu()
        all_logits.append(logits)
        if labels is not None:
            all_labels.append(labels.cpu())
    if not all_labels:
        raise ValueError("eval_dataset has no 'label' / 'labels' column: task metrics need labels.")
    if task == "causal-lm":
        width = max(t.shape[1] for t in all_logits)
        all_logits = [torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1])) for t in all_logits]
        all_labels = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-100) for t in all_labels]
    logits = torch.cat(all_logits).numpy()
    labels = torch.cat(all_labels).numpy()
    if compute_metrics is not None:
        return {k: float(v) for k, v in compute_metrics(EvalPrediction(predictions=logits, label_ids=labels)).items()}
    return classification_metrics(np.argmax(logits, axis=-1), labels)


def compression_report(
    models: Mapping[str, nn.Module | str | os.PathLike],
    eval_dataset: Any = None,
    compute_metrics: Callable | None = None,
    *,
    task: str | None = None,
    processing_class: Any = None,
    data_collator: Callable | None = None,
    batch_size: int = 32,
    max_eval_batches: int | None = None,
    latency_batches: int = 10,
    warmup: int = 2,
    text_column: str = "text",
    max_length: int | None = None,
    methods: Mapping[str, Sequence[str]] | None = None,
    device: str | torch.device | None = None,
) -> CompressionReport:
    """Measure models side by side: parameters, non-zeros, bytes on disk, memory, bits per parameter, latency and
    task metrics.

    Every model is measured the same way on the same batches. Models given as paths are loaded with the class named
    in their config (quantized checkpoints load through transformers' own quantized loading); models given as modules
    are saved to a temporary folder with `save_pretrained` (safetensors) to measure their bytes on disk, before any
    forward pass (bitsandbytes' CPU kernels repack 4-bit weights on first use).

    Args:
        models (`dict[str, nn.Module | str]`): name -> model or saved folder, in table order; the first is the
            reference of the ratio columns ("x smaller", speed-up).
        eval_dataset (*optional*): evaluation data (a `datasets.Dataset`, tokenized or with a text column plus
            `processing_class`, or a sequence of feature dicts). Without it, only size figures are reported.
        compute_metrics (`Callable`, *optional*): a Trainer-style `compute_metrics(EvalPrediction)`; defaults to
            accuracy / precision / recall / F1 ([`~hf_compress.make_compute_metrics`]) for classification and
            perplexity for causal LMs.
        task (`str`, *optional*): `"classification"` or `"causal-lm"`; inferred from the first model's class.
        processing_class (*optional*): tokenizer used to tokenize raw text and pad batches.
        data_collator (`Callable`, *optional*): batch collator; defaults to padding with `processing_class`.
        batch_size (`int`, *optional*, defaults to 32): evaluation and latency batch size.
        max_eval_batches (`int`, *optional*): evaluate on at most this many batches.
        latency_batches (`int`, *optional*, defaults to 10): timed forward passes (0 skips latency).
        warmup (`int`, *optional*, defaults to 2): untimed forward passes before timing.
        text_column (`str`, *optional*, defaults to `"text"`): raw text column, tokenized when needed.
        max_length (`int`, *optional*): truncation length when tokenizing here.
        methods (`dict[str, list[str]]`, *optional*): compression methods applied per model name, kept in the report.
        device (`str` or `torch.device`, *optional*): device for models loaded from a path (default: CPU, or the GPU
            for quantized checkpoints when one is present). Modules are measured where they are.

    Returns:
        [`CompressionReport`]

    Example:

    ```python
    >>> from hf_compress import compression_report
    >>> report = compression_report({"teacher": teacher, "student": "out/student"}, eval_dataset=test_set,
    ...                             processing_class=tokenizer)  # doctest: +SKIP
    >>> print(report.to_markdown())  # doctest: +SKIP
    ```
    """
    if not models:
        raise ValueError("models: pass at least one model (name -> module or path).")
    if task is not None and task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; allowed: {list(TASKS)} or None (inferred).")
    for name, value in (("batch_size", batch_size), ("latency_batches", latency_batches), ("warmup", warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "batch_size" else 0):
            raise ValueError(f"{name}={value!r} must be an integer >= {1 if name == 'batch_size' else 0}.")
    methods = methods or {}
    unknown = set(methods) - set(models)
    if unknown:
        raise ValueError(f"methods: names {sorted(unknown)} are not models of this report ({list(models)}).")

    batches: list[dict[str, torch.Tensor]] | None = None
    if eval_dataset is not None:
        batches = _prepare_batches(
            eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            batch_size=batch_size,
            text_column=text_column,
            max_length=max_length,
            max_batches=max_eval_batches,
        )
    rows: list[ReportRow] = []
    for name, model_or_path in models.items():
        if isinstance(model_or_path, (str, os.PathLike)):
            if not Path(model_or_path).exists():
                raise FileNotFoundError(f"models[{name!r}]: no saved model at {str(model_or_path)!r}.")
            disk = disk_bytes(model_or_path)
            model = load_model(model_or_path, device=device)
        else:
            model = unwrap_model(model_or_path)
            disk = disk_bytes(model)  # before any forward pass, see the docstring
        params, nonzero = count_parameters(model)
        if task is None:
            task = infer_report_task(model)
        row = ReportRow(
            name=name,
            parameters=params,
            nonzero_parameters=nonzero,
            disk_bytes=disk,
            memory_bytes=memory_bytes(model),
            methods=list(methods.get(name, [])),
        )
        if batches is not None:
            if latency_batches > 0:
                row.latency_ms = measure_latency(model, batches, warmup=warmup, repeats=latency_batches)
                row.latency_device = str(_model_device(model))
            if task is not None or compute_metrics is not None:
                row.metrics = evaluate_model(model, batches, task or "classification", compute_metrics)
        logger.info(f"compression_report: {name}: {row.to_dict()}")
        rows.append(row)
    return CompressionReport(rows=rows, task=task)


# ----------------------------------------------------------------------------------------------------------------
# model card and Trainer callback


def model_card_section(figures: Mapping[str, Any], methods: Sequence[str], reference: Mapping[str, Any] | None = None):
    """The Markdown section hf_compress writes into a model card."""
    lines = [MODEL_CARD_BEGIN, "## Compression (hf_compress)", ""]
    if methods:
        lines += ["Methods applied:", ""] + [f"- {m}" for m in methods] + [""]
    lines += ["| figure | value |", "|---|---:|"]
    labels = {
        "parameters": "parameters",
        "nonzero_parameters": "non-zero parameters",
        "sparsity": "sparsity",
        "size_mb": "weights on disk (MB)",
        "bits_per_parameter": "bits per parameter",
    }
    for key, label in labels.items():
        if key in figures:
            value = figures[key]
            text = f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
            lines.append(f"| {label} | {text} |")
    extra = {k: v for k, v in figures.items() if k not in labels}
    for key, value in extra.items():
        lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if reference:
        ref_mb = reference.get("size_mb")
        if ref_mb and figures.get("size_mb"):
            lines.append(
                f"| x smaller than {reference.get('name', 'reference')} | {ref_mb / figures['size_mb']:.1f} |"
            )
    lines.append(MODEL_CARD_END)
    return "\n".join(lines)


def write_model_card(
    folder: str | os.PathLike,
    figures: Mapping[str, Any],
    methods: Sequence[str] = (),
    reference: Mapping[str, Any] | None = None,
) -> Path:
    """Write (or update in place) the hf_compress section of `folder/README.md`; other content is kept."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "README.md"
    section = model_card_section(figures, methods, reference)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if MODEL_CARD_BEGIN in text and MODEL_CARD_END in text:
            before, rest = text.split(MODEL_CARD_BEGIN, 1)
            after = rest.split(MODEL_CARD_END, 1)[1]
            text = before + section + after
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
    else:
        text = "---\nlibrary_name: transformers\ntags:\n- hf_compress\n- model-compression\n---\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def _default_methods(args: Any, model: nn.Module, figures: Mapping[str, Any]) -> list[str]:
    methods = []
    if hasattr(args, "temperature") and hasattr(args, "alpha") and hasattr(args, "loss_type"):
        methods.append(
            f"knowledge distillation ({args.loss_type}, temperature={args.temperature}, alpha={args.alpha})"
        )
    if figures.get("sparsity", 0) > 0.01:
        methods.append(f"pruning ({100 * figures['sparsity']:.1f}% of all parameters are zero)")
    qc = getattr(getattr(unwrap_model(model), "config", None), "quantization_config", None)
    if qc is not None:
        methods.append(f"quantization ({getattr(qc, 'quant_method', type(qc).__name__)})")
    return methods


class CompressionReportCallback(TrainerCallback):
    """Logs the trained model's size figures at evaluation time and writes them into the saved model card.

    At every evaluation, `<prefix>_parameters`, `<prefix>_nonzero_parameters`, `<prefix>_sparsity`,
    `<prefix>_size_mb` and `<prefix>_bits_per_parameter` are added to the evaluation metrics (`prefix` is the
    metric prefix, `eval` by default): they appear in the dict `trainer.evaluate()` returns, in
    `state.log_history` (so in `trainer_state.json`) and in the logs of the callbacks that run after this one (the
    progress bar / printer). Integrations registered before it (TensorBoard, W&B through `report_to`) get the
    figures from `log_history` rather than live. Sizes here are the state dict's tensor bytes; at `on_save` the real
    safetensors files of the checkpoint are measured. On save (`checkpoint-*/README.md`) and at the end of training
    (`output_dir/README.md`), the figures and the methods applied are written into the model card on the main
    process; an existing README is kept and only the hf_compress section is replaced.

    Args:
        methods (`list[str]`, *optional*): the methods applied, as they should read in the model card; by default
            inferred (distillation settings from a `DistillationConfig`, sparsity, quantization config).
        reference (`dict`, *optional*): figures of the reference model (`{"name": "teacher", "size_mb": 14.2}`),
            giving an "x smaller" line in the card.

    >>> from hf_compress import CompressionReportCallback
    >>> callback = CompressionReportCallback(methods=["distillation from bert-base (T=2, alpha=0.5)"])
    """

    def __init__(self, methods: Sequence[str] | None = None, reference: Mapping[str, Any] | None = None):
        if methods is not None and (isinstance(methods, str) or not all(isinstance(m, str) for m in methods)):
            raise ValueError(f"methods={methods!r} must be a list of strings.")
        self.methods = list(methods) if methods is not None else None
        self.reference = dict(reference) if reference else None
        self.last_figures: dict[str, Any] | None = None

    @staticmethod
    def _prefix(logs: Mapping[str, Any]) -> str | None:
        for key in logs:
            if key.endswith("_runtime") and not key.startswith("train"):
                return key[: -len("_runtime")]
        return None

    def _figures(self, model: nn.Module | None, disk: int | None = None) -> dict[str, Any] | None:
        if model is None:
            return None
        self.last_figures = size_figures(model, disk)
        return self.last_figures

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        figures = self._figures(model)
        if figures is None or metrics is None:
            return
        prefix = self._prefix(metrics) or "eval"
        metrics.update({f"{prefix}_{k}": v for k, v in figures.items()})

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs:
            return
        prefix = self._prefix(logs)
        if prefix is None:
            return
        figures = self._figures(model)
        if figures is None:
            return
        extra = {f"{prefix}_{k}": v for k, v in figures.items()}
        logs.update(extra)
        # The Trainer appended a copy of these logs to log_history just before calling on_log.
        if state.log_history and all(state.log_history[-1].get(k) == v for k, v in logs.items() if k not in extra):
            state.log_history[-1].update(extra)

    def _write(self, args, state, model, folder: Path, measure_files: bool) -> None:
        if not state.is_world_process_zero or model is None:
            return
        disk = None
        if measure_files and folder.is_dir():
            try:
                disk = disk_bytes(folder)
            except FileNotFoundError:
                disk = None
        figures = size_figures(model, disk)
        methods = self.methods if self.methods is not None else _default_methods(args, model, figures)
        write_model_card(folder, figures, methods, self.reference)

    def on_save(self, args, state, control, model=None, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            self._write(args, state, model, folder, measure_files=True)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write(args, state, model, Path(args.output_dir), measure_files=True)


__all__ = [
    "CompressionReport",
    "CompressionReportCallback",
    "ReportRow",
    "compression_report",
    "disk_bytes",
    "estimated_disk_bytes",
    "measure_latency",
    "memory_bytes",
    "size_figures",
    "write_model_card",
]
