"""Unstructured and N:M pruning of Linear / GPT-2 Conv1D weights: mask selection and application.

Scores come from [`~hf_compress.pruning.scoring`]; this module picks which weights survive (lowest scores pruned,
per layer, globally, or per group of M input weights) and applies the masks, either as hard zeros in the weights
(what [`PruningCallback`] uses, so checkpoints stay plain transformers checkpoints) or as a
`torch.nn.utils.prune` reparametrization (`weight_orig * weight_mask`) for users training in their own loops.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from transformers.utils import logging

from ..utils.modules import find_linear_modules, is_conv1d, unwrap_model
from ..utils.sharding import (
    count_nonzero,
    gathered,
    is_dtensor,
    is_zero3_param,
    logical_numel,
    mul_,
    shard_like,
    unshard_like,
)
from .config import PruningConfig
from .schedule import nm_keep_count
from .scoring import Scorer, get_scorer_class

logger = logging.get_logger(__name__)

MASK_ATTRIBUTE = "weight"


def get_pruning_targets(model: nn.Module, config: PruningConfig) -> dict[str, nn.Module]:
    """The modules `config` prunes, by qualified name (PEFT adapters excluded, base layers included)."""
    return find_linear_modules(unwrap_model(model), config.target_modules, config.exclude_modules)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return is_dtensor(tensor)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank if `tensor` is an FSDP2 / tensor-parallel DTensor shard (a collective), else
    `tensor` itself."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _shard_like(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`mask` laid out like `weight`: a full mask becomes a DTensor with the weight's mesh and placements (rank 0's
    copy is scattered, so every rank applies the same mask), or under ZeRO-3 the flat slice of rank 0's mask that
    this rank's partition holds; a plain weight gets `mask` on its device."""
    return shard_like(mask, weight)


def _full_mask(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The whole mask from one laid out like `weight` (DTensor shard or ZeRO-3 partition; a collective then)."""
    return unshard_like(mask, weight)


def num_kept(mask: torch.Tensor, weight: torch.Tensor | None = None) -> int:
    """Number of True entries of a keep-mask, DTensor shards and ZeRO-3 partitions of `weight` included (a
    collective then)."""
    return count_nonzero(mask, weight)


def _to_stored_layout(module: nn.Module, keep_out_in: torch.Tensor) -> torch.Tensor:
    return keep_out_in.t().contiguous() if is_conv1d(module) else keep_out_in.contiguous()


def _to_out_in(module: nn.Module, stored: torch.Tensor) -> torch.Tensor:
    return stored.t() if is_conv1d(module) else stored


def _keep_lowest_pruned(scores: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Keep-mask of `scores` (any shape) with exactly `num_pruned` lowest entries set to False."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if num_pruned > 0:
        # Same selection rule as torch.nn.utils.prune.L1Unstructured (topk of the lowest), on arbitrary scores.
        keep[torch.topk(scores.flatten(), num_pruned, largest=False).indices] = False
    return keep.view_as(scores)


def _keep_lowest_pruned_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (out, in) pruning the `round(sparsity * in_features)` lowest scores of every output row (Wanda's
    per-output comparison group)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    num_pruned = round(sparsity * scores.shape[1])
    if num_pruned > 0:
        keep.scatter_(1, torch.topk(scores, num_pruned, dim=1, largest=False).indices, False)
    return keep


def _nm_keep(scores: torch.Tensor, keep_per_group: int, m: int, name: str) -> torch.Tensor:
    """Keep the `keep_per_group` best of every M consecutive input weights of each output row (hand-written:
    torch has no N:M mask selection; torchao.sparsity, which had one, is gone)."""
    out_features, in_features = scores.shape
    if in_features % m:
        raise ValueError(
            f"pattern N:{m} cannot be applied to {name!r}: its {in_features} input features are not a multiple of "
            f"{m}. Exclude it with exclude_modules=[{name.split('.')[-1]!r}] or use pattern='unstructured'."
        )
    groups = scores.reshape(out_features, in_features // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(groups, keep_per_group, dim=-1).indices, True)
    return keep.reshape(out_features, in_features)


@torch.no_grad()
def compute_masks(
    model: nn.Module,
    config: PruningConfig,
    *,
    sparsity: float | None = None,
    calibration_data=None,
    previous_masks: dict[str, torch.Tensor] | None = None,
    modules: dict[str, nn.Module] | None = None,
    scorer: Scorer | None = None,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = weight survives), shaped like each module's stored weight.

    Args:
        model (`nn.Module`): the model (DDP / compile wrappers are removed).
        config ([`PruningConfig`]): method, scope, pattern and targets.
        sparsity (`float`, *optional*): target of this call; defaults to `config.target_sparsity`. For an N:M
            pattern a lower target keeps more weights per group (see `schedule.nm_keep_count`).
        calibration_data (*optional*): batches for calibration-based scorers (Wanda).
        previous_masks (`dict[str, torch.Tensor]`, *optional*): masks of an earlier step; weights they pruned stay
            pruned, so a gradual schedule never revives a weight.
        modules (`dict[str, nn.Module]`, *optional*): targets, if already resolved.
        scorer ([`Scorer`], *optional*): a prepared scorer to reuse.
    """
    modules = modules if modules is not None else get_pruning_targets(model, config)
    sparsity = config.target_sparsity if sparsity is None else sparsity
    if scorer is None:
        scorer = get_scorer_class(config.method)()
        if scorer.requires_calibration and calibration_data is None:
            raise ValueError(
                f"method={config.method!r} needs calibration_data (a few batches of model inputs); none was given."
            )
        scorer.prepare(model, modules, calibration_data, config.num_calibration_batches)

    if scorer.chooses_masks:
        nm = config.nm
        keep_out_in = scorer.select_masks_(
            model,
            modules,
            sparsity=sparsity,
            nm=(nm_keep_count(config, sparsity), nm[1]) if nm is not None else None,
            previous_masks=(
                {n: _to_out_in(modules[n], m) for n, m in previous_masks.items() if n in modules}
                if previous_masks
                else None
            ),
        )
        return {name: _shard_like(_to_stored_layout(m, keep_out_in[name]), m.weight) for name, m in modules.items()}

    scores = {}
    for name, module in modules.items():
        # FSDP2 shards / ZeRO-3 partitions: score the whole weight (identical on every rank), so masks are whole and
        # identical too. Under ZeRO-3 one module's weight is gathered at a time.
        with gathered([module.weight]):
            score = _full(scorer.score(name, module))
        if previous_masks is not None and name in previous_masks:
            previous = _full_mask(previous_masks[name], module.weight).to(score.device)
            score = score.masked_fill(~_to_out_in(module, previous), float("-inf"))
        scores[name] = score

    masks: dict[str, torch.Tensor] = {}
    nm = config.nm
    if nm is not None:
        keep_per_group = nm_keep_count(config, sparsity)
        for name, module in modules.items():
            masks[name] = _to_stored_layout(module, _nm_keep(scores[name], keep_per_group, nm[1], name))
    elif config.scope == "global":
        flat = torch.cat([s.flatten().cpu() for s in scores.values()])
        keep = _keep_lowest_pruned(flat, round(sparsity * flat.numel()))
        offset = 0
        for name, module in modules.items():
            n = scores[name].numel()
            keep_out_in = keep[offset : offset + n].view_as(scores[name]).to(scores[name].device)
            masks[name] = _to_stored_layout(module, keep_out_in)
            offset += n
    elif config.scope == "row":
        for name, module in modules.items():
            masks[name] = _to_stored_layout(module, _keep_lowest_pruned_per_row(scores[name], sparsity))
    else:
        for name, module in modules.items():
            score = scores[name]
            masks[name] = _to_stored_layout(module, _keep_lowest_pruned(score, round(sparsity * score.numel())))
    for name, module in modules.items():
        masks[name] = _shard_like(masks[name], module.weight)
        scorer.update_weights_(name, module, masks[name])
    return masks


def _is_reparametrized(module: nn.Module) -> bool:
    return any(
        isinstance(hook, torch_prune.BasePruningMethod) and hook._tensor_name == MASK_ATTRIBUTE
        for hook in module._forward_pre_hooks.values()
    )


@torch.no_grad()
def apply_masks_(
    modules: dict[str, nn.Module], masks: dict[str, torch.Tensor], *, reparametrize: bool = False
) -> None:
    """Zero the pruned weights in place, or (`reparametrize=True`) install `torch.nn.utils.prune` masks."""
    for name, mask in masks.items():
        module = modules[name]
        if _is_reparametrized(module):
            torch_prune.remove(module, MASK_ATTRIBUTE)
        if reparametrize:
            if is_dtensor(module.weight) or is_zero3_param(module.weight):
                raise ValueError(
                    f"reparametrize=True is not supported for the sharded (FSDP2 / ZeRO-3) weight of {name!r}: use "
                    "reparametrize=False (zeros written into the weights) with PruningCallback."
                )
            torch_prune.custom_from_mask(module, MASK_ATTRIBUTE, mask.to(module.weight.device, module.weight.dtype))
        else:
            mul_(module.weight, _shard_like(mask, module.weight))


def prune_(
    model: nn.Module,
    config: PruningConfig,
    calibration_data=None,
    *,
    sparsity: float | None = None,
    reparametrize: bool = False,
) -> dict[str, torch.Tensor]:
    """Prune `model` in place to `config` and return the keep-masks by module name.

    Args:
        model (`nn.Module`): a transformers model (or any module with Linear / Conv1D layers), possibly PEFT-wrapped:
            then the base layers are pruned, never `lora_A` / `lora_B`.
        config ([`PruningConfig`]): what and how to prune.
        calibration_data (*optional*): an iterable of batches (dicts of tensors or `input_ids` tensors) for
            `method="wanda"`; the first `config.num_calibration_batches` are used.
        sparsity (`float`, *optional*): override of `config.target_sparsity` (used by schedules).
        reparametrize (`bool`, *optional*, defaults to `False`):
            `False` writes zeros into the weights (they can grow back if you then train without
            [`PruningCallback`]); `True` installs `torch.nn.utils.prune` masks (`weight_orig`, `weight_mask`) so a
            plain training loop keeps them; call [`make_pruning_permanent_`] before saving.

    Returns:
        `dict[str, torch.Tensor]`: boolean keep-masks shaped like each stored weight.

    Example:

    ```python
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from hf_compress import PruningConfig, prune_, sparsity_report
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4))
    >>> masks = prune_(model, PruningConfig(pattern="2:4"))
    >>> sparsity_report(model, pattern="2:4")["n_m_compliant"]
    True
    ```
    """
    if config.requires_calibration and calibration_data is None:
        raise ValueError(
            f"method={config.method!r} needs calibration_data: pass a few batches of model inputs to "
            "prune_(model, config, calibration_data=...)."
        )
    modules = get_pruning_targets(model, config)
    masks = compute_masks(model, config, sparsity=sparsity, calibration_data=calibration_data, modules=modules)
    apply_masks_(modules, masks, reparametrize=reparametrize)
    kept = sum(num_kept(m, modules[n].weight) for n, m in masks.items())
    total = sum(logical_numel(modules[n].weight) for n in masks)
    logger.info(f"Pruned {len(masks)} modules with {config.method}/{config.pattern}: sparsity {1 - kept / total:.4f}")
    return masks


@torch.no_grad()
def make_pruning_permanent_(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Bake masks into plain weights so `save_pretrained` writes an ordinary checkpoint.

    Removes every `torch.nn.utils.prune` reparametrization of a `weight` (`weight_orig * weight_mask` becomes
    `weight`), and zeroes the pruned positions of `masks` (names as returned by [`prune_`]) if given.
    """
    model = unwrap_model(model)
    named = dict(model.named_modules())
    for module in named.values():
        if _is_reparametrized(module):
            torch_prune.remove(module, MASK_ATTRIBUTE)
    if masks:
        for name, mask in masks.items():
            mul_(named[name].weight, _shard_like(mask, named[name].weight))
    return model
