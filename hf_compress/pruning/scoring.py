"""Importance scores for pruning: a small registry, so new criteria plug in without touching the callback.

A scorer turns a weight into a score of the same (out_features, in_features) shape; the lowest scores are pruned.
Magnitude and Wanda are implemented here. A scorer that chooses its masks itself while rewriting the kept weights
(SparseGPT, in `sparsegpt.py`) sets `chooses_masks = True` and implements [`Scorer.select_masks_`]; one that only
rewrites kept weights after the mask is chosen can override [`Scorer.update_weights_`]; movement pruning (which needs weights and gradients during training) can set
`observes_training = True` and accumulate in [`Scorer.observe_step`], which the callback calls before every
optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..utils.modules import is_conv1d, unwrap_model
from ..utils.sharding import full_tensor, is_dtensor

_SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(name: str):
    """Class decorator registering a [`Scorer`] under `name` (the value of `PruningConfig.method`)."""

    def decorator(cls: type[Scorer]) -> type[Scorer]:
        _SCORERS[name] = cls
        return cls

    return decorator


def available_scorers() -> list[str]:
    return sorted(_SCORERS)


def get_scorer_class(name: str) -> type[Scorer]:
    return _SCORERS[name]


def weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out_features, in_features); a view (GPT-2 `Conv1D` stores it transposed).

    An FSDP2 `DTensor` weight is gathered whole first (a collective; the result is then a copy), so scores combine
    it with plain tensors such as Wanda's activation norms.
    """
    weight = full_tensor(module.weight) if is_dtensor(module.weight) else module.weight
    return weight.t() if is_conv1d(module) else weight


class Scorer:
    """Base class of pruning criteria.

    Attributes:
        requires_calibration (`bool`): whether [`Scorer.prepare`] needs calibration batches.
        observes_training (`bool`): whether [`Scorer.observe_step`] must be called at every optimizer step.
    """

    requires_calibration: bool = False
    observes_training: bool = False
    # `PruningConfig.scope` when left unset: the comparison group the method is meant for.
    default_scope: str = "layer"
    # True: `compute_masks` asks `select_masks_` for the masks instead of ranking `score`s (SparseGPT).
    chooses_masks: bool = False

    def prepare(self, model: nn.Module, modules: dict[str, nn.Module], calibration_data=None, num_batches=8) -> None:
        """Collect whatever the score needs (activation statistics...) before [`Scorer.score`] is called."""

    def score(self, name: str, module: nn.Module) -> torch.Tensor:
        """A float score shaped (out_features, in_features): higher is more important."""
        raise NotImplementedError

    def observe_step(self, modules: dict[str, nn.Module]) -> None:
        """Called before each optimizer step when `observes_training` is set (e.g. movement scores)."""

    def update_weights_(self, name: str, module: nn.Module, keep_mask: torch.Tensor) -> None:
        """Optionally rewrite the kept weights after a mask is chosen."""

    def select_masks_(
        self,
        model: nn.Module,
        modules: dict[str, nn.Module],
        *,
        sparsity: float,
        nm: tuple[int, int] | None,
        previous_masks: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """For `chooses_masks` scorers: choose the keep-masks, shaped (out_features, in_features), and rewrite the
        weights in place. `nm` is `(kept, M)` per group for N:M patterns, `None` for unstructured."""
        raise NotImplementedError


@register_scorer("magnitude")
class MagnitudeScorer(Scorer):
    """|W| (L1 magnitude)."""

    def score(self, name: str, module: nn.Module) -> torch.Tensor:
        return weight_as_out_in(module).detach().abs().float()


def _move_to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict) or hasattr(batch, "items"):
        return {k: _move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move_to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def run_calibration(model: nn.Module, calibration_data: Iterable, num_batches: int) -> int:
    """Forward `num_batches` batches (dicts of tensors, or `input_ids` tensors) in eval mode; returns the count."""
    model = unwrap_model(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: activation statistics (and so masks) must be deterministic
    seen = 0
    try:
        for batch in calibration_data:
            if seen >= num_batches:
                break
            batch = _move_to_device(batch, device)
            if isinstance(batch, torch.Tensor):
                model(input_ids=batch)
            else:
                batch = {k: v for k, v in batch.items() if k != "labels"}
                model(**batch)
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibration_data yielded no batch: Wanda needs at least one calibration batch.")
    return seen


@register_scorer("wanda")
class WandaScorer(Scorer):
    """|W_ij| x ||X_j||_2, the norm of input feature j over all calibration tokens (Sun et al. 2023, Wanda).

    Hand-written: no maintained library exposes Wanda scores as a function (the authors' repository is a script).
    """

    requires_calibration = True
    default_scope = "row"  # the paper's per-output comparison group

    def __init__(self):
        self.input_sq_norms: dict[str, torch.Tensor] = {}

    def prepare(self, model, modules, calibration_data=None, num_batches=8) -> None:
        if calibration_data is None:
            raise ValueError(
                "method='wanda' needs calibration_data: pass a few batches (a list of dicts of tensors or a "
                "DataLoader) to prune_(..., calibration_data=...) or PruningCallback(..., calibration_data=...)."
            )
        self.input_sq_norms = {}
        handles = []

        def make_hook(name):
            def hook(module, args):
                x = args[0].detach().float()
                sq = x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0)
                prev = self.input_sq_norms.get(name)
                self.input_sq_norms[name] = sq if prev is None else prev + sq

            return hook

        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(make_hook(name)))
        try:
            run_calibration(model, calibration_data, num_batches)
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in modules if name not in self.input_sq_norms]
        if missing:
            raise ValueError(f"Wanda calibration never reached these modules (no input seen): {missing[:5]}")

    def score(self, name: str, module: nn.Module) -> torch.Tensor:
        weight = weight_as_out_in(module).detach().abs().float()
        norms = self.input_sq_norms[name].to(weight.device).sqrt()
        return weight * norms.unsqueeze(0)


from . import sparsegpt as _sparsegpt  # noqa: E402,F401  (registers "sparsegpt")
