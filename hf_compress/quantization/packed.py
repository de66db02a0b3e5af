"""Small exports: int4 weights packed two per byte on disk, an optional int8 embedding, the rest in bf16.

torchao 0.18 has no int4 layout that is both created on CPU and serialized by transformers' `TorchAoConfig`: its
only CPU-made int4 tensor (`IntxUnpackedToInt8Tensor`, what `quantize_model(..., "torchao-int4")` and QAT's int4
convert produce) stores each 4-bit value in a whole int8 byte; the packed ones (`Int4Tensor`, `Int4TilePackedTo4dTensor`)
need the CUDA-only `mslk` / tinygemm kernels to be made. So this module stores the *same* integers and scales as
torchao's int4 weight-only quantization (symmetric, one scale per `group_size` inputs, taken from torchao's own
quantized tensors) packed two per byte, and dequantizes them with torchao's `dequantize_affine` at run time:
outputs equal those of the torchao int4 model in memory, at half its bytes.

Loading uses transformers' quantizer plugin API (`register_quantizer` / `register_quantization_config`, method
`"hf_compress_packed"`): after `import hf_compress`, a stock `AutoModelForCausalLM.from_pretrained(folder)` rebuilds
the packed layers. Hand-written: the packing (nibbles), the layers and the quantizer are not in any library of
this stack.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from ..utils.packed_int4 import (  # noqa: F401  (re-exported)
    Int8Embedding,
    PackedInt4Linear,
    PackedQuantizationConfig,
    TiedInt8Head,
    _set_module,
    pack_int4,
    unpack_int4,
)


def _torchao_int_data(weight: torch.Tensor, bits: int, granularity) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(qdata, scale, zero_point) of torchao's IntxWeightOnlyConfig applied to `weight` (same integers exactly)."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_

    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        holder.weight.copy_(weight)
    quantize_(
        holder, IntxWeightOnlyConfig(weight_dtype=torch.int4 if bits == 4 else torch.int8, granularity=granularity)
    )
    tensor = holder.weight
    zero = tensor.zero_point
    if zero is not None and bool((zero != 0).any()):
        raise ValueError("packed export expects symmetric quantization (zero points of 0).")
    return tensor.qdata, tensor.scale, None


@torch.no_grad()
def quantize_packed_(
    model: nn.Module,
    *,
    group_size: int = 32,
    embedding_bits: int | None = 8,
    storage_dtype: torch.dtype = torch.bfloat16,
    target_modules: list[str] | None = None,
) -> nn.Module:
    """Quantize `model` in place to the packed layout: int4 Linear layers of the blocks, an int8 embedding (and tied
    head) if `embedding_bits=8`, everything else in `storage_dtype`. `save_pretrained` then writes 4-bit weights.

    Args:
        model (`PreTrainedModel`): a float model (e.g. after pruning, distillation or QAT).
        group_size (`int`, *optional*, defaults to 32): inputs sharing one scale; must divide every `in_features`.
        embedding_bits (`int`, *optional*, defaults to 8): 8 quantizes the input embedding (and a tied output head)
            to int8 per row; `None` keeps it in `storage_dtype`.
        storage_dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): dtype of scales and of every
            weight left unquantized (norms, untied head).
        target_modules (`list[str]`, *optional*): Linear layers to pack; defaults to every Linear in the blocks.
    """
    from torchao.quantization.granularity import PerAxis, PerGroup

    from ..utils.modules import find_linear_modules, unwrap_model

    if embedding_bits not in (None, 8):
        raise ValueError(f"embedding_bits={embedding_bits!r} is not supported; allowed: 8 or None.")
    model = unwrap_model(model)
    targets = {n: m for n, m in find_linear_modules(model, target_modules).items() if isinstance(m, nn.Linear)}
    for name, module in targets.items():
        if module.in_features % group_size or module.in_features % 2:
            raise ValueError(f"group_size={group_size} does not divide in_features={module.in_features} of {name!r}.")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    embedding_name = head_name = None
    for name, module in targets.items():
        qdata, scale, _ = _torchao_int_data(module.weight, 4, PerGroup(group_size))
        new = PackedInt4Linear(
            module.in_features,
            module.out_features,
            group_size,
            module.bias is not None,
            dtype=storage_dtype,
            device=module.weight.device,
        )
        new.qweight.copy_(pack_int4(qdata))
        new.scale.copy_(scale.reshape(new.scale.shape))
        if module.bias is not None:
            new.bias.copy_(module.bias)
        _set_module(model, name, new)
    if embedding_bits == 8:
        embedding = model.get_input_embeddings()
        embedding_name = next(n for n, m in model.named_modules() if m is embedding)
        qdata, scale, _ = _torchao_int_data(embedding.weight, 8, PerAxis(0))
        new = Int8Embedding(
            embedding.num_embeddings,
            embedding.embedding_dim,
            embedding.padding_idx,
            dtype=storage_dtype,
            device=embedding.weight.device,
        )
        new.qweight.copy_(qdata)
        new.scale.copy_(scale.reshape(new.scale.shape))
        head = model.get_output_embeddings() if tied else None
        _set_module(model, embedding_name, new)
        if head is not None and head.weight is embedding.weight:
            head_name = next(n for n, m in model.named_modules() if m is head)
            _set_module(model, head_name, TiedInt8Head(new))
            model.config.tie_word_embeddings = False  # the head is rebuilt from the int8 embedding on load
            if hasattr(model.config, "get_text_config"):
                model.config.get_text_config().tie_word_embeddings = False
    # The rest to storage_dtype (quantized above from the original weights). Non-persistent buffers (rotary
    # inv_freq) are rebuilt in float32 by from_pretrained: keep them as they are.
    kept = [
        (m, b, m._buffers[b])
        for m in model.modules()
        for b in m._non_persistent_buffers_set
        if m._buffers.get(b) is not None
    ]
    model.to(storage_dtype)
    for module, buffer_name, value in kept:
        module._buffers[buffer_name] = value
    model.config.quantization_config = PackedQuantizationConfig(
        group_size=group_size,
        int4_modules=sorted(targets),
        embedding_module=embedding_name,
        tied_head_module=head_name,
        storage_dtype=str(storage_dtype).removeprefix("torch."),
    )
    model.config.dtype = storage_dtype
    return model


def save_packed_model(
    model: nn.Module, output_dir: str | os.PathLike, *, processing_class=None, **kwargs
) -> nn.Module:
    """Copy `model`, [`quantize_packed_`] it with `kwargs`, save it to `output_dir`; returns the packed copy."""
    packed = quantize_packed_(copy.deepcopy(model), **kwargs)
    packed.save_pretrained(output_dir)
    if processing_class is not None:
        processing_class.save_pretrained(output_dir)
    return packed
