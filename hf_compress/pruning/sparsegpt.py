"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot").

Each targeted layer is pruned so that its outputs on calibration inputs X change least: with the Hessian
H = X^T X of the layer-wise least-squares problem, columns are processed left to right in blocks; a pruned weight's
error is spread onto the not-yet-processed weights of its row through the inverse Hessian (the Optimal Brain
Surgeon update), and the mask of each block of columns is chosen by the OBS saliency w^2 / [H^-1]_jj^2. Layers are
pruned block after block, each transformer block seeing the outputs of the already pruned earlier blocks, as in the
authors' reference implementation (github.com/IST-DASLab/sparsegpt: `sparsegpt.py`, `llama.py`), whose defaults this
follows: 128 columns per block, dampening 1% of the mean Hessian diagonal.

Written by hand: no library of this stack (torch, torchao, transformers, peft, accelerate) implements SparseGPT; the
reference repository is a research script, not a package.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..utils.modules import unwrap_model
from .scoring import Scorer, _move_to_device, register_scorer, weight_as_out_in

logger = logging.get_logger(__name__)


@torch.no_grad()
def sparsegpt_prune_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    pruned_before: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one weight matrix with SparseGPT's OBS reconstruction.

    Args:
        weight (`torch.Tensor`): shaped (out_features, in_features); not modified.
        hessian (`torch.Tensor`): X^T X of the layer inputs, shaped (in_features, in_features) (any positive scale).
        sparsity (`float`): fraction of weights pruned in each block of columns (unstructured).
        nm (`tuple[int, int]`, *optional*): `(kept, M)`: keep `kept` of every M consecutive inputs of each row.
        blocksize (`int`, *optional*, defaults to 128): columns per lazy-update block.
        percdamp (`float`, *optional*, defaults to 0.01): dampening added to the diagonal, as a fraction of its mean.
        pruned_before (`torch.Tensor`, *optional*): boolean (out, in), True where a weight is already pruned: it
            stays pruned (gradual schedules).

    Returns:
        `(new_weight, keep_mask)`: the reconstructed float32 weight (zeros where pruned) and the boolean keep-mask.
    """
    W = weight.detach().clone().float()
    rows, columns = W.shape
    H = hessian.detach().clone().float().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns, device=W.device)
    H[diag, diag] += damp
    # Upper Cholesky factor of H^-1: its rows give the OBS updates of the remaining columns in one sweep.
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)

    pruned = torch.zeros_like(W, dtype=torch.bool)
    prune_per_group = nm[1] - nm[0] if nm is not None else 0
    m = nm[1] if nm is not None else 0
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        before = pruned_before[:, i1:i2] if pruned_before is not None else None
        if nm is None:
            saliency = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            if before is not None:
                saliency = saliency.masked_fill(before, -1.0)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            num = round(saliency.numel() * sparsity)
            if num > 0:
                mask1.view(-1)[torch.topk(saliency.flatten(), num, largest=False).indices] = True
            if before is not None:
                mask1 |= before
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and prune_per_group > 0 and i % m == 0:
                saliency = W1[:, i : i + m] ** 2 / (torch.diag(Hinv1)[i : i + m].reshape((1, -1))) ** 2
                if before is not None:
                    saliency = saliency.masked_fill(before[:, i : i + m], -1.0)
                mask1.scatter_(1, i + torch.topk(saliency, prune_per_group, dim=1, largest=False).indices, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, ~pruned


class _StopForward(Exception):
    pass


def _block_of(name: str) -> tuple[str, int] | None:
    """`("model.layers", 3)` for `model.layers.3.mlp.up_proj`; None outside a numbered block."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part)
    return None


def _accepts(model: nn.Module, argument: str) -> bool:
    import inspect

    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _forward(model: nn.Module, batch: Any) -> None:
    extra = {"use_cache": False} if _accepts(model, "use_cache") else {}
    if isinstance(batch, torch.Tensor):
        model(input_ids=batch, **extra)
    else:
        model(**{k: v for k, v in batch.items() if k != "labels"}, **extra)


@register_scorer("sparsegpt")
class SparseGPTScorer(Scorer):
    """SparseGPT: mask chosen by OBS saliency and kept weights reconstructed from calibration inputs (see the module
    docstring). Selected with `PruningConfig(method="sparsegpt")`; `prune_` / `PruningCallback` then rewrite the
    kept weights, not only zero the pruned ones.

    Args:
        blocksize (`int`, *optional*, defaults to 128): columns per lazy-update block (the reference's default).
        percdamp (`float`, *optional*, defaults to 0.01): Hessian dampening, fraction of the mean diagonal.
    """

    requires_calibration = True
    chooses_masks = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01):
        self.blocksize = blocksize
        self.percdamp = percdamp
        self._calibration: Any = None
        self._num_batches = 8

    def prepare(self, model, modules, calibration_data=None, num_batches=8) -> None:
        if calibration_data is None:
            raise ValueError(
                "method='sparsegpt' needs calibration_data: pass a few batches (a list of dicts of tensors or a "
                "DataLoader) to prune_(..., calibration_data=...) or PruningCallback(..., calibration_data=...)."
            )
        self._calibration = calibration_data
        self._num_batches = num_batches

    def score(self, name: str, module: nn.Module) -> torch.Tensor:
        raise NotImplementedError("SparseGPT chooses its masks in select_masks_ (chooses_masks=True).")

    # ------------------------------------------------------------------------------------------------------------
    def _batches(self, device: torch.device) -> list[Any]:
        batches = []
        for batch in self._calibration:
            if len(batches) >= self._num_batches:
                break
            batches.append(_move_to_device(batch, device))
        if not batches:
            raise ValueError("calibration_data yielded no batch: SparseGPT needs at least one calibration batch.")
        return batches

    def _prune_group(self, group: dict[str, nn.Module], hessians, counts, sparsity, nm, previous_masks, keep):
        for name, module in group.items():
            if counts.get(name, 0) == 0:
                raise ValueError(f"SparseGPT calibration never reached {name!r} (no input seen).")
            weight = weight_as_out_in(module)
            before = None
            if previous_masks is not None and name in previous_masks:
                before = ~previous_masks[name].to(weight.device)
            new, mask = sparsegpt_prune_weight(
                weight,
                hessians[name],
                sparsity,
                nm=nm,
                blocksize=self.blocksize,
                percdamp=self.percdamp,
                pruned_before=before,
            )
            weight.copy_(new.to(weight.dtype))  # a view of the stored weight (GPT-2 Conv1D: transposed)
            keep[name] = mask

    @staticmethod
    def _hessian_hooks(group: dict[str, nn.Module], hessians: dict, counts: dict) -> list:
        def make_hook(name):
            def hook(module, args):
                x = args[0].detach().float()
                x = x.reshape(-1, x.shape[-1])
                h = x.t().matmul(x)
                hessians[name] = h if name not in hessians else hessians[name] + h
                counts[name] = counts.get(name, 0) + x.shape[0]

            return hook

        return [module.register_forward_pre_hook(make_hook(name)) for name, module in group.items()]

    @torch.no_grad()
    def select_masks_(self, model, modules, *, sparsity, nm, previous_masks=None) -> dict[str, torch.Tensor]:
        if self._calibration is None:
            raise ValueError("SparseGPT: prepare(...) with calibration_data must be called before select_masks_.")
        from .unstructured import _is_dtensor

        if any(_is_dtensor(m.weight) for m in modules.values()):
            raise ValueError(
                "method='sparsegpt' does not support FSDP2/DTensor-sharded weights: prune the model with prune_ "
                "before wrapping it, or use method='wanda'."
            )
        model = unwrap_model(model)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        keep: dict[str, torch.Tensor] = {}
        try:
            batches = self._batches(device)
            blocks = {name: _block_of(name) for name in modules}
            lists = {b[0] for b in blocks.values() if b is not None}
            if len(lists) == 1 and all(b is not None for b in blocks.values()):
                self._sequential(model, modules, blocks, lists.pop(), batches, sparsity, nm, previous_masks, keep)
            else:
                # Targets outside one list of blocks: one calibration pass on the model as it is, then all at once.
                logger.warning(
                    "SparseGPT: the targets are not all inside one list of transformer blocks; their Hessians come "
                    "from one pass of the unpruned model (not block by block)."
                )
                hessians, counts = {}, {}
                handles = self._hessian_hooks(modules, hessians, counts)
                try:
                    for batch in batches:
                        _forward(model, batch)
                finally:
                    for handle in handles:
                        handle.remove()
                self._prune_group(modules, hessians, counts, sparsity, nm, previous_masks, keep)
        finally:
            model.train(was_training)
        self._sync_weights(modules)
        return keep

    def _sequential(self, model, modules, blocks, list_name, batches, sparsity, nm, previous_masks, keep) -> None:
        layers = model.get_submodule(list_name)
        inputs: list[tuple[tuple, dict]] = []

        def catch(module, args, kwargs):
            inputs.append((args, kwargs))
            raise _StopForward

        handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for batch in batches:
                try:
                    _forward(model, batch)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        if len(inputs) != len(batches):
            raise ValueError(f"SparseGPT: calibration batches never reached the first block of {list_name!r}.")

        for index, layer in enumerate(layers):
            group = {n: modules[n] for n, b in blocks.items() if b[1] == index}
            if group:
                hessians, counts = {}, {}
                handles = self._hessian_hooks(group, hessians, counts)
                try:
                    for args, kwargs in inputs:
                        layer(*args, **kwargs)
                finally:
                    for h in handles:
                        h.remove()
                self._prune_group(group, hessians, counts, sparsity, nm, previous_masks, keep)
            # The next block sees this block's outputs after pruning (the reference's sequential order).
            outputs = []
            for args, kwargs in inputs:
                out = layer(*args, **kwargs)
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                if args:
                    outputs.append(((hidden,) + tuple(args[1:]), kwargs))
                else:
                    outputs.append(((), {**kwargs, "hidden_states": hidden}))
            inputs = outputs

    @staticmethod
    def _sync_weights(modules: dict[str, nn.Module]) -> None:
        # DDP: masks are broadcast from rank 0 by the callback; the reconstructed weights must match too.
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() == 1:
            return
        for name in sorted(modules):
            torch.distributed.broadcast(modules[name].weight.data, src=0)
