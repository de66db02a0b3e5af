"""The packed int4 checkpoint format of hf_compress: packing, the layers, and the transformers quantizer plugin
that rebuilds them in `from_pretrained` (method `"hf_compress_packed"`). Kept in utils (light imports) so that
`import hf_compress` can register it without importing the quantization package; see
[`~hf_compress.quantization.packed.quantize_packed_`] for how checkpoints are made.

Hand-written: nibble packing, these layers and the quantizer are not in any library of this stack.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "hf_compress_packed"


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], last dimension even -> uint8 bytes (low nibble first), last dimension halved."""
    if values.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dimension ({values.shape[-1]}) must be even.")
    nibbles = (values.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of [`pack_int4`]: uint8 bytes -> int8 values in [-8, 7]."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    values = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(values >= 8, values - 16, values)


def _dequantize(qdata, scale, zero_point, block_size, bits, dtype):
    from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, dequantize_affine

    target = torch.int4 if bits == 4 else torch.int8
    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[target]
    if zero_point is None:
        zero_point = torch.zeros_like(scale, dtype=torch.int8)
    return dequantize_affine(qdata, block_size, scale, zero_point, torch.int8, qmin, qmax, output_dtype=dtype)


class PackedInt4Linear(nn.Module):
    """A Linear whose weight is int4 (two values per byte, `qweight`), one `scale` per `group_size` inputs."""

    def __init__(self, in_features, out_features, group_size, bias, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, in_features // group_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def weight_counts(self) -> tuple[int, int]:
        """(weights, non-zero weights), for `count_parameters`."""
        return self.qweight.numel() * 2, int(torch.count_nonzero(unpack_int4(self.qweight)))

    def dequantized_weight(self) -> torch.Tensor:
        return _dequantize(unpack_int4(self.qweight), self.scale, None, (1, self.group_size), 4, self.scale.dtype)

    def forward(self, x):
        return nn.functional.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int8Embedding(nn.Module):
    """An embedding stored as int8 with one scale per row (torchao int8 per-axis symmetric)."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(num_embeddings, 1, dtype=dtype, device=device))

    def weight_counts(self) -> tuple[int, int]:
        return self.qweight.numel(), int(torch.count_nonzero(self.qweight))

    def dequantized_weight(self) -> torch.Tensor:
        return _dequantize(self.qweight, self.scale, None, (1, self.embedding_dim), 8, self.scale.dtype)

    def forward(self, ids):
        # Same values as dequantizing the whole table, without materialising it.
        return _dequantize(
            self.qweight[ids], self.scale[ids], None, (1,) * ids.dim() + (self.embedding_dim,), 8, self.scale.dtype
        )


class TiedInt8Head(nn.Module):
    """The output head of a model with tied embeddings, computed from the int8 embedding (no weights of its own)."""

    def __init__(self, embedding: Int8Embedding):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: its buffers are saved once

    def forward(self, x):
        return nn.functional.linear(x, self._embedding.dequantized_weight().to(x.dtype))


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


# ---------------------------------------------------------------------------------------------------------------
# transformers plugin: the config (in config.json) and the quantizer that rebuilds the packed layers on load


class PackedQuantizationConfig(QuantizationConfigMixin):
    """`quantization_config` of a packed export (see [`quantize_packed_`])."""

    def __init__(
        self,
        group_size: int = 32,
        int4_modules: list[str] | None = None,
        embedding_module: str | None = None,
        tied_head_module: str | None = None,
        storage_dtype: str = "bfloat16",
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.group_size = group_size
        self.int4_modules = list(int4_modules or [])
        self.embedding_module = embedding_module
        self.tied_head_module = tied_head_module
        self.storage_dtype = storage_dtype

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "group_size": self.group_size,
            "int4_modules": self.int4_modules,
            "embedding_module": self.embedding_module,
            "tied_head_module": self.tied_head_module,
            "storage_dtype": self.storage_dtype,
        }


class PackedHfQuantizer(HfQuantizer):
    """Rebuilds [`PackedInt4Linear`] / [`Int8Embedding`] / [`TiedInt8Head`] layers before the weights load."""

    requires_calibration = True  # only pre-quantized checkpoints (made by quantize_packed_) are loaded

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs):
        from .imports import require_backend

        require_backend("torchao", "Loading an hf_compress packed int4 checkpoint")

    def update_dtype(self, dtype):
        return getattr(torch, self.quantization_config.storage_dtype)

    def _process_model_before_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        dtype = getattr(torch, config.storage_dtype)
        for name in config.int4_modules:
            old = model.get_submodule(name)
            _set_module(
                model,
                name,
                PackedInt4Linear(
                    old.in_features,
                    old.out_features,
                    config.group_size,
                    old.bias is not None,
                    dtype=dtype,
                    device=old.weight.device,
                ),
            )
        if config.embedding_module:
            old = model.get_submodule(config.embedding_module)
            new = Int8Embedding(
                old.num_embeddings, old.embedding_dim, old.padding_idx, dtype=dtype, device=old.weight.device
            )
            _set_module(model, config.embedding_module, new)
            if config.tied_head_module:
                _set_module(model, config.tied_head_module, TiedInt8Head(new))

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the packed format with transformers (idempotent); done when transformers' modeling code is
    imported after `import hf_compress`."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, PackedQuantizationConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, PackedHfQuantizer)
