"""Measuring models: parameters, non-zeros, bytes on disk and in memory, latency and task metrics, side by side in
[`compression_report`]. Rendering the result is `render.py`'s job."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..utils import count_parameters, unwrap_model
from ..utils.model_path import check_saved_model_folder
from ..utils.tasks import CAUSAL_LM, SEQUENCE_CLASSIFICATION, normalize_task
from .render import _MB, CompressionReport, ReportRow

logger = logging.get_logger(__name__)


TASKS = (SEQUENCE_CLASSIFICATION, CAUSAL_LM)
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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
    from ..utils.loading import is_gguf, load_pretrained

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
        return CAUSAL_LM
    if name.endswith("ForSequenceClassification"):
        return SEQUENCE_CLASSIFICATION
    return None


def _device_label(model: nn.Module) -> str:
    """Where latency was measured: the device, with torch's thread count on CPU (it changes CPU latency most)."""
    device = _model_device(model)
    if device.type != "cpu":
        return str(device)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"


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
    label2id: Mapping[str, int] | None = None,
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
        if "labels" in dataset.column_names and dataset.features["labels"].dtype == "string":
            to_id = label_id_mapping(dataset.unique("labels"), label2id)
            dataset = dataset.map(lambda b: {"labels": [to_id[v] for v in b["labels"]]}, batched=True)
    elif len(dataset) and isinstance(dataset[0], Mapping) and isinstance(dataset[0].get("labels"), str):
        to_id = label_id_mapping({row["labels"] for row in dataset}, label2id)
        dataset = [{**row, "labels": to_id[row["labels"]]} for row in dataset]
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


def label_id_mapping(labels: Iterable[str], label2id: Mapping[str, int] | None) -> dict[str, int]:
    """Class ids of string labels through a model config's `label2id` (exact, else case-insensitive).

    Raises:
        `ValueError` naming the labels that do not map and the `label2id` there is.
    """
    label2id = dict(label2id or {})
    lower = {str(k).lower(): v for k, v in label2id.items()}
    mapping, missing = {}, []
    for label in sorted(set(labels)):
        if label in label2id:
            mapping[label] = label2id[label]
        elif label.lower() in lower:
            mapping[label] = lower[label.lower()]
        else:
            missing.append(label)
    if missing:
        raise ValueError(
            f"eval_dataset: string labels {missing} are not in the model's label2id {label2id}: set the model config's "
            "label2id / id2label to these names (or pass a datasets ClassLabel column, or integer labels)."
        )
    return mapping


def _label2id(model_or_path: Any) -> dict[str, int] | None:
    """`label2id` of a model or saved folder (None when it has none or the folder does not exist yet)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        if not Path(model_or_path).is_dir():
            return None
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_or_path)
    else:
        config = getattr(unwrap_model(model_or_path), "config", None)
    return dict(getattr(config, "label2id", None) or {}) or None


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

    from ..metrics import classification_metrics, compute_perplexity

    model = unwrap_model(model)
    model.eval()
    task = normalize_task(task, TASKS)
    if task == CAUSAL_LM and compute_metrics is None:
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
    if task == CAUSAL_LM:
        width = max(t.shape[1] for t in all_logits)
        all_logits = [torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1])) for t in all_logits]
        all_labels = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-100) for t in all_labels]
    logits = torch.cat(all_logits).numpy()
    labels = torch.cat(all_labels).numpy()
    if compute_metrics is not None:
        return {k: float(v) for k, v in compute_metrics(EvalPrediction(predictions=logits, label_ids=labels)).items()}
    return classification_metrics(np.argmax(logits, axis=-1), labels)


def _size_row(name: str, model_or_path, device, methods: Sequence[str]) -> tuple[nn.Module, ReportRow]:
    """The model (loaded when given as a path) and its row with the size figures filled in."""
    if isinstance(model_or_path, (str, os.PathLike)):
        if not Path(model_or_path).exists():
            raise FileNotFoundError(f"models[{name!r}]: no saved model at {str(model_or_path)!r}.")
        if Path(model_or_path).is_dir():  # e.g. a Trainer output folder holding only checkpoints: say so
            check_saved_model_folder(model_or_path, f"models[{name!r}]")
        disk = disk_bytes(model_or_path)
        model = load_model(model_or_path, device=device)
    else:
        model = unwrap_model(model_or_path)
        disk = disk_bytes(model)  # before any forward pass, see compression_report's docstring
    params, nonzero = count_parameters(model)
    row = ReportRow(
        name=name,
        parameters=params,
        nonzero_parameters=nonzero,
        disk_bytes=disk,
        memory_bytes=memory_bytes(model),
        methods=list(methods),
    )
    return model, row


# Longer than 80 lines because of its docstring (a public API: every argument documented); the code is 53 lines.
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
    decode_tokens: int = 0,
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
        task (`str`, *optional*): `"sequence-classification"` (also `"classification"`, `"text-classification"`,
            `"SEQ_CLS"`) or `"causal-lm"` (also `"text-generation"`, `"CAUSAL_LM"`); inferred from the first model's
            class.
        processing_class (*optional*): tokenizer used to tokenize raw text and pad batches.
        data_collator (`Callable`, *optional*): batch collator; defaults to padding with `processing_class`.
        batch_size (`int`, *optional*, defaults to 32): evaluation and latency batch size.
        max_eval_batches (`int`, *optional*): evaluate on at most this many batches.
        latency_batches (`int`, *optional*, defaults to 10): timed forward passes (0 skips latency).
        warmup (`int`, *optional*, defaults to 2): untimed forward passes before timing.
        text_column (`str`, *optional*, defaults to `"text"`): raw text column, tokenized when needed.
        max_length (`int`, *optional*): truncation length when tokenizing here.
        methods (`dict[str, list[str]]`, *optional*): compression methods applied per model name, kept in the report.
        device (`str` or `torch.device`, *optional*): device for models loaded from a path (default: the first GPU
            when one is present, else CPU, the same for every path so that latencies compare). Modules are measured
            where they are.
        decode_tokens (`int`, *optional*, defaults to 0): causal LMs: when > 0, also measure batch-1 greedy decoding
            of this many tokens per run (tokens/s, [`~hf_compress.decode_tokens_per_second`]: static KV cache, CUDA
            graphs on a GPU), the serving figure 4-bit weights improve.

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
    if task is not None:
        task = normalize_task(task, TASKS)
    checks = (("batch_size", batch_size), ("latency_batches", latency_batches), ("warmup", warmup))
    for name, value in checks + (("decode_tokens", decode_tokens),):
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
            label2id=_label2id(next(iter(models.values()))),  # string labels map through the model's label2id
        )
    if device is None and torch.cuda.is_available():
        # One device for every model loaded from a path: float checkpoints on the CPU next to quantized ones on the
        # GPU gave latencies 40x apart that measured the device, not the compression.
        device = "cuda:0"
    rows: list[ReportRow] = []
    for name, model_or_path in models.items():
        model, row = _size_row(name, model_or_path, device, methods.get(name, []))
        if task is None:
            task = infer_report_task(model)
        if batches is not None:
            if latency_batches > 0:
                row.latency_ms = measure_latency(model, batches, warmup=warmup, repeats=latency_batches)
                row.latency_device = _device_label(model)
            if task is not None or compute_metrics is not None:
                row.metrics = evaluate_model(model, batches, task or SEQUENCE_CLASSIFICATION, compute_metrics)
        if decode_tokens and (task or infer_report_task(model)) == CAUSAL_LM:
            from ..inference import decode_tokens_per_second

            row.decode_tokens_per_s = decode_tokens_per_second(model, new_tokens=decode_tokens)
            row.latency_device = _device_label(model)
        logger.info(f"compression_report: {name}: {row.to_dict()}")
        rows.append(row)
    return CompressionReport(rows=rows, task=task)


__all__ = [
    "TASKS",
    "WEIGHT_FILE_SUFFIXES",
    "compression_report",
    "disk_bytes",
    "estimated_disk_bytes",
    "evaluate_model",
    "infer_report_task",
    "load_model",
    "measure_latency",
    "memory_bytes",
    "size_figures",
    "weight_files",
]
