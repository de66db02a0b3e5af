"""Finding the modules a compression method acts on, and unwrapping models from DDP / PEFT / compile wrappers."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

try:  # GPT-2 style models use a transposed "Conv1D" that is a linear layer in disguise.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())

# Output heads are never compressed by default: they are small and compressing them costs the most quality.
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "pre_classifier", "pooler", "cls", "embed_out")
# PEFT adapter sub-modules: compression acts on the frozen base layer, never on the adapter itself.
_ADAPTER_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def linear_weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or a GPT-2 Conv1D (whose weight is stored transposed)."""
    weight = module.weight
    if isinstance(Conv1D, type) and isinstance(module, Conv1D):
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], weight.shape[1]


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(Conv1D, type) and isinstance(module, Conv1D)


def _as_list(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def name_matches(name: str, pattern: str) -> bool:
    """PEFT-like matching: a plain name matches the module name or any dotted suffix of it; otherwise a regex
    that must match the whole qualified name (`re.fullmatch`)."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _in_repeated_block(name: str) -> bool:
    # Transformer blocks live in an nn.ModuleList, so their parameters carry a numeric path component
    # (`encoder.layer.3.`, `model.layers.0.`, `transformer.h.11.`).
    return any(part.isdigit() for part in name.split("."))


def _is_head_or_adapter(name: str) -> bool:
    parts = name.split(".")
    return any(p in _HEAD_NAMES for p in parts) or any(p in _ADAPTER_MARKERS for p in parts)


def find_linear_modules(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    *,
    argument_name: str = "target_modules",
    module_types: Iterable[type[nn.Module]] | None = None,
) -> dict[str, nn.Module]:
    """Linear-like modules to compress, by qualified name.

    Args:
        model (`nn.Module`): the model (wrappers are removed first).
        target_modules (`str` or `list[str]`, *optional*):
            names or regexes (PEFT-style). Defaults to every Linear/Conv1D inside the repeated transformer blocks;
            embeddings, output heads and norms are left alone unless named here.
        exclude_modules (`str` or `list[str]`, *optional*): names or regexes removed from the selection.
        argument_name (`str`): the argument name quoted in error messages.

    Raises:
        ValueError: when a pattern of `target_modules` matches no Linear-like module, or nothing is selected.
    """
    model = unwrap_model(model)
    types = tuple(module_types) if module_types is not None else LINEAR_TYPES
    candidates = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, types) and not any(p in _ADAPTER_MARKERS for p in name.split("."))
    }
    targets = _as_list(target_modules)
    if targets and targets != ["all-linear"]:
        selected = {}
        for pattern in targets:
            hits = {n: m for n, m in candidates.items() if name_matches(n, pattern)}
            if not hits:
                examples = ", ".join(sorted({n.split(".")[-1] for n in candidates})[:12])
                raise ValueError(
                    f"{argument_name}: pattern {pattern!r} matches no Linear module of {type(model).__name__}. "
                    f"Linear module names in this model end in: {examples}."
                )
            selected.update(hits)
    else:
        selected = {n: m for n, m in candidates.items() if _in_repeated_block(n) and not _is_head_or_adapter(n)}
    for pattern in _as_list(exclude_modules):
        selected = {n: m for n, m in selected.items() if not name_matches(n, pattern)}
    if not selected:
        raise ValueError(
            f"{argument_name}={target_modules!r} with exclude_modules={exclude_modules!r} selects no Linear module "
            f"of {type(model).__name__}."
        )
    return selected


@torch.no_grad()
def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), counting each shared tensor once; quantized weights (bitsandbytes 4-bit,
    torchao tensor subclasses) count as non-zero."""
    seen: set[int] = set()
    total = nonzero = 0
    for p in unwrap_model(model).parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        # bitsandbytes 4-bit weights pack two values per byte; their logical count is stored on the quant state.
        qs = getattr(p, "quant_state", None)
        if qs is not None and getattr(qs, "shape", None) is not None:
            n = int(torch.Size(qs.shape).numel())
            total += n
            nonzero += n
            continue
        total += n
        if p.is_meta:
            nonzero += n
            continue
        if getattr(p, "qdata", None) is not None:  # torchao quantized tensor: count its integers
            nonzero += int(torch.count_nonzero(p.qdata).item()) if p.qdata.numel() == n else n
            continue
        try:
            nonzero += int(torch.count_nonzero(p).item())
        except (NotImplementedError, RuntimeError, TypeError):
            # Other quantized tensor subclasses implement no count_nonzero; like packed bitsandbytes weights, they
            # count as non-zero.
            nonzero += n
    # hf_compress' packed layers (utils/packed_int4.py) hold their weights as buffers: count them too.
    for module in unwrap_model(model).modules():
        counter = getattr(module, "weight_counts", None)
        if callable(counter):
            n, nz = counter()
            total += n
            nonzero += nz
    return total, nonzero
