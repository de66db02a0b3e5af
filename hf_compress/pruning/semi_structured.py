"""2:4 semi-structured sparse weights for GPU inference (`torch.sparse.to_sparse_semi_structured`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..utils.modules import find_linear_modules, is_conv1d, unwrap_model
from .report import nm_compliant
from .scoring import weight_as_out_in


@torch.no_grad()
def to_semi_structured_sparse_(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
) -> list[str]:
    """Store the 2:4-pruned Linear weights of `model` as `torch.sparse.SparseSemiStructuredTensor` (in place).

    Sparse tensor cores (NVIDIA Ampere or newer) then run these layers' matmuls on the compressed weights. GPT-2
    `Conv1D` layers are replaced by equivalent `nn.Linear` layers first. Inference only (the weights stop being
    trainable). Prune with `PruningConfig(pattern="2:4")` first.

    Args:
        model (`nn.Module`): a model on a CUDA device in float16 or bfloat16.
        target_modules, exclude_modules: as in [`PruningConfig`] (default: Linear layers of the blocks).

    Returns:
        `list[str]`: names of the converted modules.

    Raises:
        RuntimeError: without CUDA, or when a weight is not on a CUDA device.
        ValueError: when a targeted weight is not 2:4 sparse or not float16/bfloat16.

    Example:

    ```python
    >>> model = model.half().cuda()
    >>> prune_(model, PruningConfig(pattern="2:4"))
    >>> to_semi_structured_sparse_(model)
    ```
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "to_semi_structured_sparse_ needs a CUDA GPU (sparse tensor cores, compute capability >= 8.0); "
            "none is available. On CPU, keep the pruned dense weights."
        )
    from torch.sparse import to_sparse_semi_structured

    model = unwrap_model(model)
    named = dict(model.named_modules())
    converted = []
    for name, module in find_linear_modules(model, target_modules, exclude_modules).items():
        weight = weight_as_out_in(module)
        if weight.device.type != "cuda":
            raise RuntimeError(f"{name}: weight is on {weight.device}; move the model to CUDA first.")
        if weight.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: weight dtype {weight.dtype} is not supported; use float16 or bfloat16.")
        if not nm_compliant(weight, 2, 4):
            raise ValueError(f"{name}: weight is not 2:4 sparse; prune it with PruningConfig(pattern='2:4') first.")
        if is_conv1d(module):
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
            linear = linear.to(device=weight.device, dtype=weight.dtype)
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(named[parent_name] if parent_name else model, child, linear)
            module = linear
        module.weight = nn.Parameter(
            to_sparse_semi_structured(module.weight.detach().contiguous()), requires_grad=False
        )
        converted.append(name)
    return converted
