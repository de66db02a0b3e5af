"""Merging a QLoRA adapter into the *dequantized* base it was trained against, optional re-quantization, and the
before/after evaluation."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..utils import require_backend, unwrap_model
from ..utils import validation as _validation
from ..utils.output import check_output_dir, prepare_output_dir
from .loading import _PEFT_TASK_TO_TASK, _auto_class, _bnb_config, _default_device_map, _dtype, _empty_model

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------
# merging
# --------------------------------------------------------------------------------------------------------------
@dataclass
class QLoRAMergeResult:
    """What [`merge_qlora`] wrote and measured."""

    output_dir: str = field(metadata={"help": "Folder of the merged full-precision model."})
    requantized_output_dir: str | None = field(default=None, metadata={"help": "Folder of the re-quantized model."})
    metrics: dict[str, dict[str, float]] = field(
        default_factory=dict,
        metadata={"help": "Eval metrics per variant: adapter_on_quantized_base, merged, requantized."},
    )


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    dataset,
    *,
    compute_metrics: Callable | None,
    data_collator: Callable | None,
    batch_size: int,
    causal: bool,
) -> dict[str, float]:
    """Mean loss (token-weighted for language models), perplexity and `compute_metrics` of one model.

    A plain loop rather than `Trainer.evaluate`: Trainer refuses purely quantized models (the re-quantized merge)."""
    from transformers import EvalPrediction, default_data_collator

    collate = data_collator or default_data_collator
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    was_training = model.training
    model.eval()
    total_loss, total_weight = 0.0, 0
    all_logits, all_labels = [], []
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = model(**batch)
        labels = batch.get("labels")
        if out.get("loss") is not None and labels is not None:
            weight = int((labels[..., 1:] != -100).sum()) if causal else int(labels.shape[0])
            total_loss += float(out.loss) * weight
            total_weight += weight
        if compute_metrics is not None and labels is not None:
            all_logits.append(out.logits.float().cpu())
            all_labels.append(labels.cpu())
    model.train(was_training)
    metrics: dict[str, float] = {}
    if total_weight:
        metrics["eval_loss"] = total_loss / total_weight
        if causal:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    if compute_metrics is not None and all_logits:
        pred = EvalPrediction(predictions=torch.cat(all_logits).numpy(), label_ids=torch.cat(all_labels).numpy())
        metrics.update(
            {k if k.startswith("eval_") else f"eval_{k}": float(v) for k, v in compute_metrics(pred).items()}
        )
    return metrics


# Longer than 80 lines because of its docstring (a public API: every argument documented); the code is 69 lines.
def merge_qlora(
    model_or_adapter_path,
    output_dir: str | os.PathLike,
    *,
    requantize: str | None = None,
    requantized_output_dir: str | os.PathLike | None = None,
    base_model_name_or_path: str | os.PathLike | None = None,
    quantization_config=None,
    dequantize_base: bool = True,
    dtype: str | torch.dtype = torch.bfloat16,
    eval_dataset=None,
    compute_metrics: Callable | None = None,
    data_collator: Callable | None = None,
    eval_batch_size: int = 8,
    overwrite: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> QLoRAMergeResult:
    """Merge a QLoRA adapter into a full-precision copy of its base and save it; optionally re-quantize.

    Merging with PEFT's `merge_and_unload` directly on a 4-bit base re-quantizes the merged weights (the adapter's
    small update is partly rounded away), and merging into the original full-precision weights drops the
    quantization error the adapter learnt to live with. Here the base is re-loaded with the same bitsandbytes
    config, dequantized (`PreTrainedModel.dequantize`), i.e. the exact weights the adapter was trained on, the
    adapter is merged there in float32, and the result is cast to `dtype` and saved. When `eval_dataset` is given,
    the loss / perplexity / `compute_metrics` of the adapter-on-quantized-base model, the merged model (reloaded from
    `output_dir`) and the re-quantized one are measured and returned.

    Args:
        model_or_adapter_path (`PeftModel` or `str`): a trained PEFT model or a folder saved with `save_pretrained`
            (`adapter_config.json`).
        output_dir (`str`): folder for the merged model.
        requantize (`str`, *optional*): `"nf4"` or `"int8"` to also save a bitsandbytes-quantized copy of the
            merged model (for serving) in `requantized_output_dir` (defaults to `<output_dir>-<requantize>`).
        base_model_name_or_path (`str`, *optional*): the base; defaults to the one recorded in the adapter config.
        quantization_config (`BitsAndBytesConfig`, *optional*): the config the base was trained under. Defaults to
            the in-memory model's own config, or for a path to the defaults of [`load_qlora_model`] (NF4, double
            quantization, bf16 compute, heads kept in full precision).
        dequantize_base (`bool`, *optional*, defaults to `True`): merge into the dequantized base. `False` merges
            into the original full-precision weights (the usual LoRA merge; changes the model by the quantization
            error).
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): dtype of the saved merged model.
        eval_dataset (*optional*): rows with `labels`; enables the before/after report.
        compute_metrics (`Callable`, *optional*): `EvalPrediction -> dict`, as for Trainer.
        data_collator (`Callable`, *optional*): defaults to `default_data_collator`.
        eval_batch_size (`int`, *optional*, defaults to 8).
        overwrite (`bool`, *optional*, defaults to `False`): allow writing into non-empty folders; only the files
            hf_compress writes (model, tokenizer, adapter, report files) are replaced there, other files are kept.
        model_kwargs (`dict`, *optional*): extra `from_pretrained` arguments for the base (`num_labels`, ...).

    Returns:
        [`QLoRAMergeResult`]

    Raises:
        FileExistsError: `output_dir` (or `requantized_output_dir`) is not empty and `overwrite=False`; nothing is
            deleted or written.
        ValueError: bad `requantize`, or no adapter found.

    Example:

    ```python
    >>> result = merge_qlora(trainer.model, "merged", requantize="nf4", eval_dataset=valid)
    >>> result.metrics["adapter_on_quantized_base"]["eval_perplexity"], result.metrics["merged"]["eval_perplexity"]
    ```
    """
    _validation.check_merge_qlora_arguments(
        model_or_adapter_path,
        requantize=requantize,
        base_model_name_or_path=base_model_name_or_path,
        dequantize_base=dequantize_base,
        dtype=dtype,
        compute_metrics=compute_metrics,
        data_collator=data_collator,
        eval_batch_size=eval_batch_size,
        overwrite=overwrite,
        model_kwargs=model_kwargs,
    )
    require_backend("peft", "Merging a QLoRA adapter")
    from peft import PeftModel

    if requantize not in (None, "nf4", "int8"):
        raise ValueError(f"requantize={requantize!r} is invalid: use None, 'nf4' or 'int8'.")
    if not isinstance(eval_batch_size, int) or eval_batch_size < 1:
        raise ValueError(f"eval_batch_size={eval_batch_size!r} is invalid: it must be a positive integer.")
    out_dtype = _dtype(dtype)
    # Both folders are checked before any work; each is cleared of earlier hf_compress files only when written.
    out = check_output_dir(output_dir, overwrite, "output_dir")
    req_out = None
    if requantize is not None:
        req_out = check_output_dir(
            requantized_output_dir or f"{out}-{requantize}", overwrite, "requantized_output_dir"
        )
        require_backend("bitsandbytes", f"Re-quantizing the merged model (requantize={requantize!r})")

    tmp = tempfile.TemporaryDirectory(prefix="hf_compress_qlora_")
    try:
        source = _merge_source(
            model_or_adapter_path, tmp.name, base_model_name_or_path, quantization_config, model_kwargs
        )
        # 1. the full-precision copy of the base: dequantized 4-bit weights (or the original ones)
        base = _full_precision_base(source, dequantize_base)
        # 2. merge in float32, cast, save
        merged = PeftModel.from_pretrained(base, source.adapter_dir).merge_and_unload()
        merged = merged.to(out_dtype)
        prepare_output_dir(out, overwrite, "output_dir")
        merged.save_pretrained(out)
        _save_tokenizer(source.adapter_dir, source.base_path, out)
        del merged, base
        logger.info(f"merge_qlora: merged model saved to {out}")
        # 3. optional re-quantization of the merged model
        if requantize is not None:
            _save_requantized(source, out, req_out, requantize, overwrite)
        # 4. before/after report
        metrics: dict[str, dict[str, float]] = {}
        if eval_dataset is not None:
            metrics = _before_after_metrics(
                source,
                out,
                req_out,
                eval_dataset,
                compute_metrics=compute_metrics,
                data_collator=data_collator,
                batch_size=eval_batch_size,
                causal=source.task == "causal-lm",
            )
    finally:
        tmp.cleanup()
    return QLoRAMergeResult(
        output_dir=str(out), requantized_output_dir=str(req_out) if req_out else None, metrics=metrics
    )


@dataclass
class _MergeSource:
    """The adapter to merge and where its base comes from."""

    adapter_dir: str
    base_path: str | os.PathLike
    task: str
    quantization_config: Any
    in_memory: nn.Module | None
    model_kwargs: dict[str, Any]
    device_map: Any

    @property
    def auto_cls(self):
        return _auto_class(self.task)


def _merge_source(model_or_adapter_path, tmp_dir: str, base_model_name_or_path, quantization_config, model_kwargs):
    """Find the adapter (a folder, or an in-memory PeftModel saved to `tmp_dir`), its base, task and 4-bit config."""
    from peft import PeftConfig, PeftModel

    model_kwargs = dict(model_kwargs or {})
    in_memory = None
    if isinstance(model_or_adapter_path, (str, os.PathLike)):
        adapter_dir = str(model_or_adapter_path)
        if not (Path(adapter_dir) / "adapter_config.json").exists():
            raise ValueError(f"model_or_adapter_path={adapter_dir!r} holds no adapter_config.json.")
        peft_config = PeftConfig.from_pretrained(adapter_dir)
    else:
        in_memory = unwrap_model(model_or_adapter_path)
        if not isinstance(in_memory, PeftModel):
            raise ValueError(
                f"model_or_adapter_path must be a PeftModel or an adapter folder, got {type(in_memory).__name__}."
            )
        adapter_dir = tmp_dir
        in_memory.save_pretrained(adapter_dir)
        peft_config = in_memory.peft_config[in_memory.active_adapter]
        if quantization_config is None:
            quantization_config = getattr(in_memory.get_base_model().config, "quantization_config", None)
    base_path = base_model_name_or_path or peft_config.base_model_name_or_path
    if base_path is None:
        raise ValueError("The adapter records no base model; pass base_model_name_or_path.")
    task = _PEFT_TASK_TO_TASK.get(str(getattr(peft_config.task_type, "value", peft_config.task_type)), None)
    task = task or "feature-extraction"
    if quantization_config is None and in_memory is None:
        from transformers import AutoConfig

        require_backend("bitsandbytes", "Merging into the dequantized 4-bit base")
        base_config = AutoConfig.from_pretrained(base_path, **model_kwargs)
        quantization_config = _bnb_config(_empty_model(task, base_config))
    return _MergeSource(
        adapter_dir, base_path, task, quantization_config, in_memory, model_kwargs, _default_device_map()
    )


def _full_precision_base(source: _MergeSource, dequantize_base: bool) -> nn.Module:
    """The base in float32: its dequantized 4-bit weights (what the adapter was trained on), or the original ones."""
    if dequantize_base and source.quantization_config is not None:
        base = source.auto_cls.from_pretrained(
            source.base_path,
            quantization_config=source.quantization_config,
            dtype=torch.float32,
            device_map=source.device_map,
            **source.model_kwargs,
        )
        base = base.dequantize()
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
            if getattr(base, flag, False):
                setattr(base, flag, False)
        return base
    return source.auto_cls.from_pretrained(
        source.base_path, dtype=torch.float32, device_map=source.device_map, **source.model_kwargs
    )


def _save_requantized(source: _MergeSource, out: Path, req_out: Path, requantize: str, overwrite: bool) -> None:
    from transformers import AutoConfig

    skeleton = _empty_model(source.task, AutoConfig.from_pretrained(out))
    qconfig = _bnb_config(skeleton, load_in_8bit=requantize == "int8")
    requantized = source.auto_cls.from_pretrained(out, quantization_config=qconfig, device_map=source.device_map)
    prepare_output_dir(req_out, overwrite, "requantized_output_dir")
    requantized.save_pretrained(req_out)
    _save_tokenizer(source.adapter_dir, source.base_path, req_out)
    del requantized
    logger.info(f"merge_qlora: {requantize} copy of the merged model saved to {req_out}")


def _before_after_metrics(source: _MergeSource, out: Path, req_out: Path | None, eval_dataset, **eval_kwargs):
    """Eval metrics of the adapter on its quantized base, of the merged model and of the re-quantized one."""
    from peft import PeftModel

    metrics: dict[str, dict[str, float]] = {}
    if source.in_memory is not None:
        reference = source.in_memory
    else:
        qbase = source.auto_cls.from_pretrained(
            source.base_path,
            quantization_config=source.quantization_config,
            device_map=source.device_map,
            **source.model_kwargs,
        )
        reference = PeftModel.from_pretrained(qbase, source.adapter_dir)
    metrics["adapter_on_quantized_base"] = _evaluate(reference, eval_dataset, **eval_kwargs)
    del reference
    merged_back = source.auto_cls.from_pretrained(out, device_map=source.device_map)
    metrics["merged"] = _evaluate(merged_back, eval_dataset, **eval_kwargs)
    del merged_back
    if req_out is not None:
        requantized_back = source.auto_cls.from_pretrained(req_out, device_map=source.device_map)
        metrics["requantized"] = _evaluate(requantized_back, eval_dataset, **eval_kwargs)
    logger.info(f"merge_qlora: eval metrics {metrics}")
    return metrics


def _save_tokenizer(adapter_dir: str, base_path, output_dir: Path) -> None:
    from transformers import AutoTokenizer

    for source in (adapter_dir, base_path):
        try:
            AutoTokenizer.from_pretrained(source).save_pretrained(output_dir)
            return
        except Exception:  # no tokenizer there (tiny test models, adapters saved without one): try the next
            continue
    logger.info("merge_qlora: no tokenizer found next to the adapter or the base; saving the model only.")


__all__ = ["QLoRAMergeResult", "merge_qlora"]
