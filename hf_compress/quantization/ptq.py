"""Post-training quantization of a trained transformers model with bitsandbytes or torchao, loadable afterwards."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..utils import require_backend, unwrap_model
from ..utils.modules import _HEAD_NAMES
from .config import did_you_mean

logger = logging.get_logger(__name__)

# method -> (backend, what it is)
PTQ_METHODS: dict[str, tuple[str, str]] = {
    "nf4": ("bitsandbytes", "4-bit NormalFloat weights (QLoRA), optional double quantization"),
    "fp4": ("bitsandbytes", "4-bit float weights, optional double quantization"),
    "int8": ("bitsandbytes", "LLM.int8(): 8-bit weights with fp16 outlier columns above llm_int8_threshold"),
    "torchao-int8": ("torchao", "int8 per-channel symmetric weights (torchao IntxWeightOnlyConfig)"),
    "torchao-int4": ("torchao", "int4 grouped symmetric weights (torchao IntxWeightOnlyConfig)"),
    "int4-packed": ("torchao", "torchao-int4's integers packed two per byte on disk, int8 embedding, bf16 rest"),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _as_dtype(value: str | torch.dtype, argument: str) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"{argument}={value!r} is not supported; allowed: {sorted(_DTYPES)}.")


def check_ptq_method(method: str) -> str:
    """Validate a PTQ method name and check its backend is installed; returns the backend name."""
    if method not in PTQ_METHODS:
        raise ValueError(
            f"method={method!r} is not a known post-training quantization method; allowed: {sorted(PTQ_METHODS)} "
            "(bitsandbytes: nf4, fp4, int8; torchao: torchao-int8, torchao-int4)." + did_you_mean(method, PTQ_METHODS)
        )
    backend = PTQ_METHODS[method][0]
    require_backend(backend, f"Post-training quantization with method={method!r}")
    return backend


def default_skip_modules(model: nn.Module) -> list[str]:
    """Top-most modules named like an output head (classifier, lm_head, score, pooler, ...): kept in full precision."""
    names: list[str] = []
    for name, _ in unwrap_model(model).named_modules():
        if name and name.split(".")[-1] in _HEAD_NAMES and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def directory_size_bytes(path: str | os.PathLike) -> int:
    """Bytes of all files under `path` (a saved checkpoint's size on disk)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def build_quantization_config(
    method: str,
    *,
    compute_dtype: str | torch.dtype = "bfloat16",
    double_quant: bool = True,
    llm_int8_threshold: float = 6.0,
    group_size: int = 32,
    skip_modules: list[str] | None = None,
) -> Any:
    """The transformers `quantization_config` (`BitsAndBytesConfig` or `TorchAoConfig`) for a PTQ `method`."""
    backend = check_ptq_method(method)
    if not llm_int8_threshold > 0:
        raise ValueError(f"llm_int8_threshold={llm_int8_threshold!r} must be > 0 (LLM.int8 uses 6.0).")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive integer.")
    if backend == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        if method == "int8":
            return BitsAndBytesConfig(
                load_in_8bit=True, llm_int8_threshold=llm_int8_threshold, llm_int8_skip_modules=skip_modules
            )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=method,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=_as_dtype(compute_dtype, "compute_dtype"),
            llm_int8_skip_modules=skip_modules,
        )
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from transformers import TorchAoConfig

    if method == "int4-packed":
        from .packed import PackedQuantizationConfig

        return PackedQuantizationConfig(group_size=group_size)
    if method == "torchao-int8":
        base = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    else:
        base = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    return TorchAoConfig(base, modules_to_not_convert=skip_modules)


def _model_class_for_path(path: str | os.PathLike):
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    for architecture in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, architecture, None)
        if cls is not None:
            return cls
    return AutoModel


def quantize_model(
    model_or_path: nn.Module | str | os.PathLike,
    method: str = "nf4",
    *,
    compute_dtype: str | torch.dtype = "bfloat16",
    double_quant: bool = True,
    llm_int8_threshold: float = 6.0,
    group_size: int = 32,
    skip_modules: list[str] | None = None,
    model_class: type | None = None,
    device_map: str | dict | None = None,
    output_dir: str | os.PathLike | None = None,
    processing_class=None,
    overwrite: bool = False,
    gguf_file: str | os.PathLike | None = None,
    storage_dtype: str | torch.dtype | None = None,
    embedding_bits: int | None = 8,
):
    """Post-training quantization of a trained model; the result saves and reloads with stock `from_pretrained`.

    The model goes through transformers' own quantized loading (a module is first saved to a temporary folder), so
    the quantized model carries its `quantization_config` and `save_pretrained` writes a loadable checkpoint. The
    model passed in is not modified.

    Methods:

    - `"nf4"` / `"fp4"`: bitsandbytes 4-bit weights (Dettmers et al., 2023, "QLoRA"), `double_quant` quantizes the
      block scales too, `compute_dtype` is the matmul dtype. Defaults follow the QLoRA recipe: NF4, double
      quantization, bfloat16 compute.
    - `"int8"`: bitsandbytes LLM.int8() (Dettmers et al., 2022): int8 weights, input columns whose magnitude
      exceeds `llm_int8_threshold` are computed in fp16.
    - `"torchao-int8"`: torchao int8 per-channel symmetric weights; `"torchao-int4"`: torchao int4 weights with one
      scale per `group_size` input features. Both run on CPU and GPU. torchao keeps each int4 value in a whole
      byte, on disk too.
    - `"int4-packed"`: the integers and scales of `"torchao-int4"` packed two per byte on disk (outputs equal the
      torchao int4 model's), the input embedding (and a tied head) int8 per row unless `embedding_bits=None`, the
      rest in `storage_dtype` (default bfloat16): the export whose bits per parameter reflect 4-bit weights.
      Loads with `from_pretrained` once `hf_compress` is imported (a transformers quantizer plugin); see
      [`~hf_compress.quantization.packed.quantize_packed_`].

    Args:
        model_or_path (`PreTrainedModel`, `str` or `os.PathLike`): a trained model or a checkpoint folder.
        method (`str`, *optional*, defaults to `"nf4"`): one of `"nf4"`, `"fp4"`, `"int8"`, `"torchao-int8"`,
            `"torchao-int4"`.
        compute_dtype (`str` or `torch.dtype`, *optional*, defaults to `"bfloat16"`): 4-bit bitsandbytes compute dtype.
        double_quant (`bool`, *optional*, defaults to `True`): bitsandbytes 4-bit nested quantization.
        llm_int8_threshold (`float`, *optional*, defaults to 6.0): LLM.int8 outlier threshold.
        group_size (`int`, *optional*, defaults to 32): `"torchao-int4"` group size; must divide the layer widths.
        skip_modules (`list[str]`, *optional*): modules kept in full precision; defaults to the output heads
            (classifier, lm_head, score, pooler, ...).
        model_class (`type`, *optional*): class used to load; defaults to the model's own class (or the checkpoint's
            `architectures`).
        device_map (`str` or `dict`, *optional*): passed to `from_pretrained`; defaults to the model's device (CPU
            when given a path and no GPU is present).
        output_dir (`str` or `os.PathLike`, *optional*): if given, the quantized model is saved there.
        processing_class (*optional*): tokenizer / processor saved with it.
        overwrite (`bool`, *optional*, defaults to `False`): allow writing into a non-empty `output_dir`.
        gguf_file (`str`, *optional*): load `model_or_path` from this GGUF file (dequantized first, see
            [`~hf_compress.utils.loading.load_pretrained`]); a path ending in `.gguf` is detected without it.
        storage_dtype (`str` or `torch.dtype`, *optional*): dtype of everything the method leaves unquantized
            (embeddings, norms, skipped heads), e.g. `"bfloat16"` so a tied embedding does not stay in float32;
            defaults to the model's dtype (`"bfloat16"` for `"int4-packed"`).
        embedding_bits (`int`, *optional*, defaults to 8): `"int4-packed"` only: 8 stores the input embedding (and
            a tied output head) as int8, `None` keeps it in `storage_dtype`.

    Returns:
        `PreTrainedModel`: the quantized model.

    Example:

    ```python
    >>> from hf_compress import quantize_model
    >>> qmodel = quantize_model("out/checkpoint-500", "nf4", output_dir="out/nf4")  # doctest: +SKIP
    ```
    """
    build_quantization_config(method, llm_int8_threshold=llm_int8_threshold, group_size=group_size)  # validates
    if output_dir is not None:
        output_dir = Path(output_dir)
        if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"output_dir={str(output_dir)!r} exists and is not empty; pass overwrite=True.")

    from transformers import PreTrainedModel

    from ..utils.loading import is_gguf, load_pretrained

    if isinstance(model_or_path, (str, os.PathLike)) and is_gguf(model_or_path, gguf_file):
        # transformers cannot quantize while reading GGUF: dequantize it, then quantize the module as below.
        model_or_path = load_pretrained(model_or_path, model_class, gguf_file=gguf_file)
    if storage_dtype is not None:
        storage_dtype = _as_dtype(storage_dtype, "storage_dtype")
    if method == "int4-packed":
        return _quantize_packed(
            model_or_path, model_class, group_size, embedding_bits, storage_dtype, output_dir, processing_class
        )
    if storage_dtype is not None and not isinstance(model_or_path, (str, os.PathLike)):
        import copy

        model_or_path = copy.deepcopy(unwrap_model(model_or_path)).to(storage_dtype)
    with tempfile.TemporaryDirectory(prefix="hf_compress_ptq_") as tmp:
        if isinstance(model_or_path, (str, os.PathLike)):
            path = Path(model_or_path)
            cls = model_class or _model_class_for_path(path)
            if device_map is None:
                device_map = {"": 0} if torch.cuda.is_available() else "cpu"
            reference = None
        else:
            reference = unwrap_model(model_or_path)
            if not isinstance(reference, PreTrainedModel):
                raise TypeError(
                    f"quantize_model needs a transformers PreTrainedModel or a checkpoint path, got "
                    f"{type(reference).__name__}."
                )
            cls = model_class or type(reference)
            if device_map is None:
                device = next(reference.parameters()).device
                device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
            reference.save_pretrained(tmp)
            path = Path(tmp)
        if skip_modules is None:
            skip_modules = default_skip_modules(reference) if reference is not None else None
        quantization_config = build_quantization_config(
            method,
            compute_dtype=compute_dtype,
            double_quant=double_quant,
            llm_int8_threshold=llm_int8_threshold,
            group_size=group_size,
            skip_modules=skip_modules,
        )
        if method.startswith("torchao") and reference is not None:
            _check_group_size(reference, method, group_size, skip_modules or [])
        kwargs: dict[str, Any] = {"quantization_config": quantization_config, "device_map": device_map}
        if reference is not None:
            kwargs["dtype"] = reference.dtype
        elif storage_dtype is not None:
            kwargs["dtype"] = storage_dtype
        quantized = cls.from_pretrained(path, **kwargs)
    quantized.eval()
    # Save before any forward pass: bitsandbytes' CPU 4-bit kernels repack weights on first use, and a checkpoint
    # written after that reloads with slightly different logits.
    if output_dir is not None:
        quantized.save_pretrained(output_dir)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        logger.info(f"Saved the {method} quantized model to {output_dir}.")
    return quantized


def _check_group_size(model: nn.Module, method: str, group_size: int, skip_modules: list[str]) -> None:
    if method != "torchao-int4":
        return
    for name, module in model.named_modules():
        # transformers' torchao integration quantizes nn.Linear only (GPT-2 Conv1D layers stay as they are).
        if not isinstance(module, nn.Linear) or any(name == s or name.startswith(s + ".") for s in skip_modules):
            continue
        in_features = module.in_features
        if in_features % group_size != 0:
            raise ValueError(
                f"group_size={group_size} does not divide in_features={in_features} of layer {name!r}; pick a "
                "group_size that divides every quantized layer's input width, or add the layer to skip_modules."
            )


def _quantize_packed(
    model_or_path, model_class, group_size, embedding_bits, storage_dtype, output_dir, processing_class
):
    """`quantize_model(..., "int4-packed")`: a packed copy (the input model is not modified), saved if asked."""
    from .packed import quantize_packed_

    if isinstance(model_or_path, (str, os.PathLike)):
        from ..utils.loading import load_pretrained

        model = load_pretrained(model_or_path, model_class)
    else:
        import copy

        model = copy.deepcopy(unwrap_model(model_or_path))
    quantize_packed_(
        model, group_size=group_size, embedding_bits=embedding_bits, storage_dtype=storage_dtype or torch.bfloat16
    )
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        logger.info(f"Saved the int4-packed model to {output_dir}.")
    return model
