"""Post-training quantization of a trained transformers model with bitsandbytes or torchao, loadable afterwards."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..utils import require_backend, unwrap_model
from ..utils.model_path import resolve_model_source
from ..utils.modules import _HEAD_NAMES
from ..utils.output import check_output_dir, prepare_output_dir
from ..utils.validation import (
    InvalidArgumentTypeError,
    check_bool,
    check_choice,
    check_device_map,
    check_int,
    check_model_class,
    check_number,
    check_output_folder,
)
from .config import did_you_mean

logger = logging.get_logger(__name__)

# method -> (backend, what it is)
PTQ_METHODS: dict[str, tuple[str, str]] = {
    "nf4": ("bitsandbytes", "4-bit NormalFloat weights (QLoRA), optional double quantization"),
    "fp4": ("bitsandbytes", "4-bit float weights, optional double quantization"),
    "int8": ("bitsandbytes", "LLM.int8(): 8-bit weights with fp16 outlier columns above llm_int8_threshold"),
    "torchao-int8": ("torchao", "int8 per-channel symmetric weights (torchao IntxWeightOnlyConfig)"),
    "torchao-int4": ("torchao", "int4 grouped symmetric weights (torchao IntxWeightOnlyConfig)"),
    "torchao-int4-cuda": (
        "torchao",
        "int4 grouped weights packed for CUDA's tinygemm kernel (torchao Int4WeightOnlyConfig, tile_packed_to_4d): "
        "bfloat16, compute capability >= 8.0; fast batch-1 decoding",
    ),
    "int4-packed": ("torchao", "torchao-int4's integers packed two per byte on disk, int8 embedding, bf16 rest"),
}
# Group sizes tinygemm (`aten._weight_int4pack_mm`) takes.
INT4_CUDA_GROUP_SIZES = (32, 64, 128, 256)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _as_dtype(value: str | torch.dtype, argument: str) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    if not isinstance(value, (str, torch.dtype)):
        raise InvalidArgumentTypeError(
            f"{argument}={value!r} is not allowed: it must be a torch dtype or one of {sorted(_DTYPES)}, got "
            f"{type(value).__name__}."
        )
    raise ValueError(f"{argument}={value!r} is not supported; allowed: {sorted(_DTYPES)}.")


def check_ptq_method(method: str) -> str:
    """Validate a PTQ method name and check its backend is installed; returns the backend name."""
    if isinstance(method, str) and method not in PTQ_METHODS:
        raise ValueError(
            f"method={method!r} is not a known post-training quantization method; allowed: {sorted(PTQ_METHODS)} "
            "(bitsandbytes: nf4, fp4, int8; torchao: torchao-int8, torchao-int4, torchao-int4-cuda)."
            + did_you_mean(method, PTQ_METHODS)
        )
    check_choice("method", method, sorted(PTQ_METHODS))
    backend = PTQ_METHODS[method][0]
    require_backend(backend, f"Post-training quantization with method={method!r}")
    if method == "torchao-int4-cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "method='torchao-int4-cuda' packs weights for a CUDA kernel (tinygemm, compute capability >= 8.0) and "
            "no CUDA GPU is available; on CPU use method='torchao-int4'."
        )
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
    _check_quantization_options(compute_dtype, double_quant, llm_int8_threshold, group_size, skip_modules)
    if method == "torchao-int4-cuda" and group_size not in INT4_CUDA_GROUP_SIZES:
        raise ValueError(
            f"group_size={group_size!r} is not supported by method='torchao-int4-cuda'; allowed: "
            f"{list(INT4_CUDA_GROUP_SIZES)} (128 is the usual choice)."
        )
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
    elif method == "torchao-int4-cuda":
        base = int4_cuda_config(group_size)
    else:
        base = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    return TorchAoConfig(base, modules_to_not_convert=skip_modules)


def int4_cuda_config(group_size: int = 128):
    """torchao's int4 weight-only config whose weights run on CUDA's tinygemm kernel (`aten._weight_int4pack_mm`).

    torchao 0.18's other int4 packings need the `mslk` kernel package (`"plain"`, `"preshuffled"`) or an NPU/XPU
    (`"plain_int32"`); `"tile_packed_to_4d"` only needs PyTorch's own CUDA kernels. Weights are asymmetric int4 with
    one bfloat16 scale and zero point per `group_size` inputs; input widths are padded to a multiple of 1024.
    """
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(
        group_size=group_size, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
    )


@torch.no_grad()
def quantize_int4_for_decoding_(
    model: nn.Module, group_size: int = 128, skip_modules: list[str] | None = None
) -> list[str]:
    """Quantize a bfloat16 model's Linear weights to int4 for CUDA's tinygemm kernel, in place (no save/reload).

    The in-memory twin of `quantize_model(model, "torchao-int4-cuda")`: same torchao config, same kernel. At batch-1
    decoding a step reads every weight once, so 4-bit weights (about 0.53 bytes per parameter with group size 128)
    cut the bytes read about 3.7x; decode through [`StaticCacheDecoder`] (static KV cache, CUDA graphs) so kernel
    launches do not hide that. Layers whose input width `group_size` does not divide stay bfloat16 (logged), as do
    `skip_modules` (default: the output heads).

    Args:
        model (`nn.Module`): a bfloat16 model on a CUDA GPU (compute capability >= 8.0).
        group_size (`int`, *optional*, defaults to 128): inputs per scale/zero point; 32, 64, 128 or 256.
        skip_modules (`list[str]`, *optional*): names (and their children) kept in bfloat16; defaults to the output
            heads (lm_head, classifier, ...).

    Returns:
        `list[str]`: the quantized module names.

    Raises:
        RuntimeError: without CUDA or when the model is not on a CUDA device.
        ValueError: for a group size tinygemm does not take, or a model that is not bfloat16.

    >>> model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()  # doctest: +SKIP
    >>> quantize_int4_for_decoding_(model)  # doctest: +SKIP
    >>> StaticCacheDecoder(model, max_cache_len=512).generate(ids, max_new_tokens=64)  # doctest: +SKIP
    """
    if isinstance(group_size, bool) or group_size not in INT4_CUDA_GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not allowed; allowed: {list(INT4_CUDA_GROUP_SIZES)}.")
    check_ptq_method("torchao-int4-cuda")
    model = unwrap_model(model)
    skip = default_skip_modules(model) if skip_modules is None else list(skip_modules)
    chosen, kept = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if module.weight.device.type != "cuda":
            raise RuntimeError(f"{name}: weight is on {module.weight.device}; move the model to CUDA first.")
        if module.weight.dtype != torch.bfloat16:
            raise ValueError(
                f"{name}: weight dtype {module.weight.dtype}; the tinygemm int4 kernel takes bfloat16 models "
                "(model.to(torch.bfloat16))."
            )
        (chosen if module.in_features % group_size == 0 else kept).append(name)
    if kept:
        logger.warning(
            f"quantize_int4_for_decoding_: {len(kept)} layers kept in bfloat16, group_size={group_size} does not "
            f"divide their input width (e.g. {kept[0]})."
        )
    if chosen:
        from torchao.quantization import quantize_

        selected = set(chosen)
        quantize_(model, int4_cuda_config(group_size), filter_fn=lambda module, fqn: fqn in selected)
    return chosen


def _check_quantization_options(compute_dtype, double_quant, llm_int8_threshold, group_size, skip_modules) -> None:
    _as_dtype(compute_dtype, "compute_dtype")
    check_bool("double_quant", double_quant)
    check_number("llm_int8_threshold", llm_int8_threshold, low=0.0, low_inclusive=False)
    # torchao's grouped quantization needs at least 2 input features per scale.
    check_int("group_size", group_size, low=2)
    if skip_modules is not None and (
        isinstance(skip_modules, str)
        or not isinstance(skip_modules, (list, tuple))
        or not all(isinstance(m, str) for m in skip_modules)
    ):
        raise InvalidArgumentTypeError(
            f"skip_modules={skip_modules!r} is not allowed: it must be a list of module names (e.g. ['lm_head']) "
            "or None."
        )


def _check_model_or_path(model_or_path, gguf_file=None) -> None:
    from ..utils.loading import is_gguf

    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        expanded = os.path.expanduser(path)
        if is_gguf(path, gguf_file):  # a `.gguf` file, or a folder holding `gguf_file`
            gguf = os.path.join(expanded, os.fspath(gguf_file)) if gguf_file is not None else expanded
            if not os.path.isfile(gguf) and not (gguf_file is not None and os.path.isfile(os.fspath(gguf_file))):
                raise ValueError(f"model_or_path={path!r}, gguf_file={gguf_file!r}: no GGUF file at {gguf!r}.")
            return
        # a missing folder, or one holding only Trainer checkpoints, fails with a clear message (not after Hub retries)
        resolve_model_source(model_or_path, "model_or_path")
        return
    check_quantizable(model_or_path)


def check_quantize_model_arguments(
    model_or_path,
    method,
    *,
    model_class,
    device_map,
    output_dir,
    processing_class,
    overwrite,
    gguf_file=None,
    **options,
) -> None:
    """Every check of [`quantize_model`] that needs no model loading, in argument order (raises on the first)."""
    _check_model_or_path(model_or_path, gguf_file)
    check_ptq_method(method)
    _check_quantization_options(**options)
    check_model_class("model_class", model_class)
    check_device_map("device_map", device_map)
    check_output_folder("output_dir", output_dir)
    if processing_class is not None and not callable(getattr(processing_class, "save_pretrained", None)):
        raise InvalidArgumentTypeError(
            f"processing_class must have save_pretrained (a tokenizer or processor), got "
            f"{type(processing_class).__name__}."
        )
    check_bool("overwrite", overwrite)


def _default_skip_modules_for_path(cls, path: str | os.PathLike) -> list[str]:
    """The output heads of the model saved at `path`, found on an empty (meta-device) instance of `cls`, so a
    checkpoint folder keeps the same layers in full precision as the in-memory model would."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    build = getattr(cls, "_from_config", None) or getattr(cls, "from_config", None)
    if build is None:
        return []
    with init_empty_weights():
        skeleton = build(config)
    return default_skip_modules(skeleton)


def _model_class_for_path(path: str | os.PathLike):
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    for architecture in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, architecture, None)
        if cls is not None:
            return cls
    return AutoModel


# Longer than 80 lines because of its docstring (a public API: every argument documented); the code is 66 lines.
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
      scale per `group_size` input features. Both run on CPU and GPU.
    - `"torchao-int4-cuda"`: int4 weights packed for CUDA's tinygemm kernel (bfloat16 model, GPU only, `group_size`
      32/64/128/256, 128 recommended): the 4-bit export that decodes faster than bfloat16 at batch 1 when decoded
      with [`StaticCacheDecoder`] (static KV cache, CUDA graphs).
      scale per `group_size` input features. Both run on CPU and GPU. torchao keeps each int4 value in a whole
      byte, on disk too.
    - `"int4-packed"`: the integers and scales of `"torchao-int4"` packed two per byte on disk (outputs equal the
      torchao int4 model's), the input embedding (and a tied head) int8 per row unless `embedding_bits=None`, the
      rest in `storage_dtype` (default bfloat16): the export whose bits per parameter reflect 4-bit weights.
      Loads with `from_pretrained` once `hf_compress` is imported (a transformers quantizer plugin); see
      [`~hf_compress.quantization.packed.quantize_packed_`].

    Args:
        model_or_path (`PreTrainedModel`, `str` or `os.PathLike`): a trained model (a PEFT model is merged into a
            copy first), or a saved model folder (`trainer.save_model()`'s output or a `checkpoint-*` folder; a
            Trainer output folder holding only checkpoints is an error that says so) or Hub name.
        method (`str`, *optional*, defaults to `"nf4"`): one of `"nf4"`, `"fp4"`, `"int8"`, `"torchao-int8"`,
            `"torchao-int4"`, `"torchao-int4-cuda"`.
        compute_dtype (`str` or `torch.dtype`, *optional*, defaults to `"bfloat16"`): 4-bit bitsandbytes compute dtype.
        double_quant (`bool`, *optional*, defaults to `True`): bitsandbytes 4-bit nested quantization.
        llm_int8_threshold (`float`, *optional*, defaults to 6.0): LLM.int8 outlier threshold.
        group_size (`int`, *optional*, defaults to 32): `"torchao-int4"` / `"torchao-int4-cuda"` group size;
            must divide the layer widths.
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
    check_quantize_model_arguments(
        model_or_path,
        method,
        gguf_file=gguf_file,
        model_class=model_class,
        device_map=device_map,
        output_dir=output_dir,
        processing_class=processing_class,
        overwrite=overwrite,
        compute_dtype=compute_dtype,
        double_quant=double_quant,
        llm_int8_threshold=llm_int8_threshold,
        group_size=group_size,
        skip_modules=skip_modules,
    )
    build_quantization_config(method, llm_int8_threshold=llm_int8_threshold, group_size=group_size)  # backend
    if output_dir is not None:
        output_dir = check_output_dir(output_dir, overwrite)

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
            if _is_peft_model(reference):
                # LoRA (or other PEFT) adapters: quantize the merged weights of a copy; the adapter stays as it is.
                reference = copy.deepcopy(reference).merge_and_unload()
            cls = model_class or type(reference)
            if device_map is None:
                device = next(reference.parameters()).device
                device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
            reference.save_pretrained(tmp)
            path = Path(tmp)
        if skip_modules is None:
            skip_modules = (
                default_skip_modules(reference) if reference is not None else _default_skip_modules_for_path(cls, path)
            )
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
        if method == "torchao-int4-cuda":
            kwargs["dtype"] = torch.bfloat16  # the tinygemm kernel's only dtype
        elif storage_dtype is not None:
            kwargs["dtype"] = storage_dtype
        quantized = cls.from_pretrained(path, **kwargs)
    quantized.eval()
    # Save before any forward pass: bitsandbytes' CPU 4-bit kernels repack weights on first use, and a checkpoint
    # written after that reloads with slightly different logits.
    if output_dir is not None:
        prepare_output_dir(output_dir, overwrite)
        quantized.save_pretrained(output_dir)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        logger.info(f"Saved the {method} quantized model to {output_dir}.")
    return quantized


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def check_quantizable(model: nn.Module, argument: str = "model_or_path") -> None:
    """Raise before any work if `quantize_model` cannot quantize `model` (checked at the start of a run by
    [`PostTrainingQuantizationCallback`], so a wrong model fails before training rather than after it).

    A transformers `PreTrainedModel` is quantizable, and so is a PEFT model on a full-precision base (its adapters
    are merged into a copy). A PEFT model on a 4-bit / 8-bit base is not: its base is already quantized.
    """
    from transformers import PreTrainedModel

    model = unwrap_model(model)
    if _is_peft_model(model):
        base = model.get_base_model()
        if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
            raise ValueError(
                f"{argument}: a PEFT model on a quantized (k-bit) base cannot be quantized again; merge its adapters "
                "into a dequantized base and requantize with merge_qlora(adapter_dir, output_dir, requantize='nf4')."
            )
        model = base
    if not isinstance(model, PreTrainedModel):
        raise InvalidArgumentTypeError(
            f"{argument}: quantize_model needs a transformers PreTrainedModel (or a PEFT model on one) or the path of "
            f"a saved model folder, got {type(model).__name__}."
        )
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is not None or getattr(model, "is_quantized", False):
        raise ValueError(
            f"{argument}: the model is already quantized ({getattr(qc, 'quant_method', qc)}); quantize_model takes a "
            "full-precision model."
        )


def _check_group_size(model: nn.Module, method: str, group_size: int, skip_modules: list[str]) -> None:
    if method not in ("torchao-int4", "torchao-int4-cuda"):
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
