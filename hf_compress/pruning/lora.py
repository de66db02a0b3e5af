"""Merging LoRA adapters into a pruned base model without filling the pruned positions."""

from __future__ import annotations

import torch
from torch import nn

from ..utils.imports import require_backend
from ..utils.modules import unwrap_model


@torch.no_grad()
def merge_lora_keep_sparsity(
    model: nn.Module, masks: dict[str, torch.Tensor] | None = None, *, safe_merge: bool = False
) -> nn.Module:
    """Merge a PEFT LoRA model (`merge_and_unload`) and re-apply the base weights' pruning masks.

    A LoRA delta `B @ A` is dense: merged as is, it writes non-zeros into every pruned position and the sparsity is
    silently lost. This merges with PEFT, then zeroes the positions that were pruned in each base layer.

    Args:
        model (`peft.PeftModel`): the LoRA model whose base layers were pruned.
        masks (`dict[str, torch.Tensor]`, *optional*): keep-masks by module name in `model` (e.g.
            `PruningCallback.masks`); defaults to the non-zeros of every base layer's weight.
        safe_merge (`bool`, *optional*, defaults to `False`): forwarded to PEFT's `merge_and_unload`.

    Returns:
        `nn.Module`: the merged base model, with at least the base's sparsity in every merged layer.

    Example:

    ```python
    >>> merged = merge_lora_keep_sparsity(peft_model)
    >>> merged.save_pretrained("pruned-merged")
    ```
    """
    require_backend("peft", "merge_lora_keep_sparsity")
    model = unwrap_model(model)
    if not hasattr(model, "merge_and_unload"):
        raise TypeError(
            f"merge_lora_keep_sparsity needs a PEFT model with merge_and_unload, got {type(model).__name__}."
        )
    named = dict(model.named_modules())
    # PEFT's merge puts the base layer object back in place of the LoRA wrapper, so keep references to those objects.
    keep: list[tuple[nn.Module, torch.Tensor]] = []
    if masks is not None:
        for name, mask in masks.items():
            if name not in named:
                raise ValueError(f"masks has a module {name!r} that is not in the model.")
            keep.append((named[name], mask))
    else:
        for module in named.values():
            base = getattr(module, "base_layer", None)
            if base is not None and hasattr(module, "lora_A") and getattr(base, "weight", None) is not None:
                weight = base.weight
                if weight.is_floating_point() and bool((weight == 0).any()):
                    keep.append((base, weight != 0))
    merged = model.merge_and_unload(safe_merge=safe_merge)
    for module, mask in keep:
        module.weight.mul_(mask.to(module.weight.device))
    return merged
