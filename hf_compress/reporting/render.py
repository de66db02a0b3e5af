"""The report and how it is rendered: rows of figures ([`ReportRow`]), the [`CompressionReport`] table (Markdown, JSON,
size-vs-quality plot) and the hf_compress section of a model card."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers.utils import logging

logger = logging.get_logger(__name__)


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
        decode_tokens_per_s (`float`, *optional*): batch-1 greedy decoding speed ([`StaticCacheDecoder`]: static KV
            cache, CUDA graphs on a GPU), measured on `latency_device`.
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
    decode_tokens_per_s: float | None = None

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
        decode = any(row.decode_tokens_per_s is not None for row in self.rows)
        header += ["decode tok/s"] if decode else []
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
            if decode:
                cells.append(f"{row.decode_tokens_per_s:.1f}" if row.decode_tokens_per_s is not None else "-")
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
# model card and Trainer callback


CARD_TAGS = ("hf_compress", "model-compression")
# method (as in compression settings) -> Hub tag
METHOD_TAGS = {
    "distillation": "knowledge-distillation",
    "pruning": "pruning",
    "structured pruning": "pruning",
    "quantization-aware training": "quantization",
    "post-training quantization": "quantization",
}


def _format_setting(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def model_card_section(
    figures: Mapping[str, Any],
    methods: Sequence[str],
    reference: Mapping[str, Any] | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
):
    """The Markdown section hf_compress writes into a model card: the methods, their settings and the size figures."""
    lines = [MODEL_CARD_BEGIN, "## Compression (hf_compress)", ""]
    if methods:
        lines += ["Methods applied:", ""] + [f"- {m}" for m in methods] + [""]
    if settings:
        lines += ["Settings:", ""]
        for method, values in settings.items():
            text = ", ".join(f"{k}={_format_setting(v)}" for k, v in values.items() if v is not None)
            lines.append(f"- {method}: {text}")
        lines.append("")
    lines += ["| figure | value |", "|---|---:|"]
    labels = {
        "parameters": "parameters",
        "nonzero_parameters": "non-zero parameters",
        "sparsity": "sparsity (whole model)",
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


def _with_metadata(text: str, base_model: str | None, tags: Sequence[str]) -> str:
    """`text` (a model card) with a YAML header holding `library_name`, `base_model` (unless set) and `tags` added to
    the ones already there; other metadata is kept."""
    from huggingface_hub import ModelCard, ModelCardData

    if text.startswith("---"):
        card = ModelCard(text)
        data, body = card.data, card.text
    else:
        data, body = ModelCardData(), text
    if not getattr(data, "library_name", None):
        data.library_name = "transformers"
    if base_model and not getattr(data, "base_model", None):
        data.base_model = base_model
    existing = list(getattr(data, "tags", None) or [])
    data.tags = existing + [t for t in dict.fromkeys((*CARD_TAGS, *tags)) if t not in existing]
    return f"---\n{data.to_yaml()}\n---\n{body}"


def _replace_section(text: str, section: str) -> str:
    if MODEL_CARD_BEGIN in text and MODEL_CARD_END in text:
        before, rest = text.split(MODEL_CARD_BEGIN, 1)
        return before + section + rest.split(MODEL_CARD_END, 1)[1]
    return text.rstrip() + "\n\n" + section + "\n"


def card_tags(settings: Mapping[str, Any] | None) -> list[str]:
    """Hub tags for the methods named in `settings` (e.g. `knowledge-distillation`, `pruning`, `quantization`)."""
    return list(dict.fromkeys(METHOD_TAGS[m] for m in settings or {} if m in METHOD_TAGS))


def write_model_card(
    folder: str | os.PathLike,
    figures: Mapping[str, Any],
    methods: Sequence[str] = (),
    reference: Mapping[str, Any] | None = None,
    *,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    base_model: str | None = None,
) -> Path:
    """Write (or update in place) the hf_compress section of `folder/README.md`; other content is kept.

    The YAML header gets `library_name: transformers`, `base_model` (when given and not already set) and the tags
    `hf_compress`, `model-compression` and one per method in `settings` (`knowledge-distillation`, `pruning`,
    `quantization`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "README.md"
    section = model_card_section(figures, methods, reference, settings)
    text = _replace_section(path.read_text(encoding="utf-8"), section) if path.is_file() else "\n" + section + "\n"
    path.write_text(_with_metadata(text, base_model, card_tags(settings)), encoding="utf-8")
    return path


def restore_model_card_section(
    folder: str | os.PathLike,
    previous: str | None,
    *,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    base_model: str | None = None,
) -> Path | None:
    """After `Trainer.create_model_card()` rewrote `folder/README.md`: put back the hf_compress section `previous`
    held, list the compression settings with the training hyperparameters and merge the YAML header (see
    [`write_model_card`]). Returns the card's path, or `None` if there is no card."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if previous and MODEL_CARD_BEGIN in previous and MODEL_CARD_END in previous:
        section = MODEL_CARD_BEGIN + previous.split(MODEL_CARD_BEGIN, 1)[1].split(MODEL_CARD_END, 1)[0]
        text = _replace_section(text, section + MODEL_CARD_END)
    if settings:
        text = _add_hyperparameters(text, settings)
    path.write_text(_with_metadata(text, base_model, card_tags(settings)), encoding="utf-8")
    return path


# names of the compression settings in the card's hyperparameter list (distillation's are its config's own names)
_HYPERPARAMETER_PREFIX = {
    "distillation": "",
    "pruning": "pruning_",
    "structured pruning": "structured_pruning_",
    "quantization-aware training": "qat_",
    "post-training quantization": "ptq_",
}


def _add_hyperparameters(text: str, settings: Mapping[str, Mapping[str, Any]]) -> str:
    """Append `- <name>: <value>` lines for the compression settings to the Trainer card's hyperparameter list."""
    marker = "The following hyperparameters were used during training:\n"
    if marker not in text:
        return text
    head, tail = text.split(marker, 1)
    lines = tail.split("\n")
    end = 0
    while end < len(lines) and lines[end].startswith("- "):
        end += 1
    present = {line[2:].split(":", 1)[0] for line in lines[:end]}
    extra = []
    for method, values in settings.items():
        prefix = _HYPERPARAMETER_PREFIX.get(method, method.replace(" ", "_").replace("-", "_") + "_")
        for key, value in values.items():
            name = f"{prefix}{key}"
            if value is not None and name not in present:
                extra.append(f"- {name}: {_format_setting(value)}")
    return head + marker + "\n".join(lines[:end] + extra + lines[end:])


__all__ = [
    "CARD_TAGS",
    "CompressionReport",
    "MODEL_CARD_BEGIN",
    "MODEL_CARD_END",
    "ReportRow",
    "card_tags",
    "model_card_section",
    "restore_model_card_section",
    "write_model_card",
]
