"""Per-batch guard of [`DistillationTrainer`]: no training step on NaN/inf, out-of-range ids or labels.

Every check of a batch is reduced to a boolean on the device and all of them travel to the host together: one host
sync per micro-batch (`BatchGuard.bad_parts`). Ids and labels outside their range are replaced *before* the forward
passes (ids clamped, labels set to -100), so an embedding lookup or a gather never crashes (on CUDA that would be a
device-side assert that kills the process) before the guard can name the problem; the batch is then refused.
Only what went wrong is examined in detail (which rows of the teacher's logits, which inputs), on the failure path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..utils.reliability import NonFiniteError

IGNORE_INDEX = -100
# Integer inputs that index an embedding table and must lie in [0, vocabulary).
ID_INPUTS = ("input_ids", "decoder_input_ids")


def _bad_flag(condition: torch.Tensor) -> torch.Tensor:
    return condition.reshape(1)


def prepare_batch_checks(
    inputs: Mapping[str, Any], *, input_id_limit: int | None, label_limit: int | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(inputs, flags)`: the inputs with out-of-range ids clamped and out-of-range labels set to -100 (so the
    forward and the loss run), and a flag per check (a one-element bool tensor, True = bad), computed on the device.

    Checked: every floating-point input (finite), `input_ids` in `[0, input_id_limit)`, integer `labels` in
    `[0, label_limit)` or -100. A label of -1 is out of range: only -100 means "ignore".
    """
    inputs = dict(inputs)
    flags: dict[str, torch.Tensor] = {}
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.is_floating_point() and value.numel():
            flags[f"input {key}"] = _bad_flag(~torch.isfinite(value.detach().sum(dtype=torch.float32)))
    if input_id_limit is not None:
        for key in ID_INPUTS:
            ids = inputs.get(key)
            if torch.is_tensor(ids) and not ids.is_floating_point() and ids.numel():
                outside = (ids < 0) | (ids >= input_id_limit)
                flags[key] = _bad_flag(outside.any())
                inputs[key] = ids.clamp(0, input_id_limit - 1)
    labels = inputs.get("labels")
    if label_limit is not None and torch.is_tensor(labels) and not labels.is_floating_point() and labels.numel():
        outside = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= label_limit))
        flags["labels"] = _bad_flag(outside.any())
        inputs["labels"] = labels.masked_fill(outside, IGNORE_INDEX)
    return inputs, flags


def bad_parts(flags: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the flags that are set: the one host sync of the guard."""
    if not flags:
        return []
    names = list(flags)
    device = flags[names[0]].device
    values = torch.cat([flags[n].to(device) for n in names]).tolist()
    return [name for name, bad in zip(names, values) if bad]


def loss_flags(parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flag per loss part (True = NaN or inf)."""
    return {name: _bad_flag(~torch.isfinite(value.detach().float())) for name, value in parts.items()}


# ------------------------------------------------------------------------------------------ failure path only
def _first_index(mask: torch.Tensor) -> list[int]:
    return [int(i) for i in mask.nonzero()[0].tolist()]


def describe_nonfinite_tensor(name: str, tensor: torch.Tensor, *, rows: bool = False) -> str | None:
    """`"<name>: NaN/inf in 2 row(s), first at [0, 3]"` (rows = all but the last dimension) or in values, or None."""
    if tensor is None or not torch.is_tensor(tensor) or not tensor.is_floating_point():
        return None
    bad = ~torch.isfinite(tensor.detach())
    if rows and bad.dim() > 1:
        bad = bad.any(-1)
        unit = "row(s)"
    else:
        unit = "value(s)"
    count = int(bad.sum())
    if not count:
        return None
    return f"{name}: NaN/inf in {count} {unit}, first at {_first_index(bad)}"


def describe_out_of_range(name: str, values: torch.Tensor, limit: int, *, ignore_index: int | None = None) -> str:
    outside = (values < 0) | (values >= limit)
    if ignore_index is not None:
        outside &= values != ignore_index
    found = sorted({int(v) for v in values[outside].unique()[:8].tolist()})
    allowed = f"[0, {limit})" + (f" or {ignore_index} (ignored)" if ignore_index is not None else "")
    return f"{name}: {int(outside.sum())} value(s) outside {allowed}, e.g. {found}, first at {_first_index(outside)}"


def raise_or_warn(
    parts: list[str],
    *,
    step: int,
    policy: str,
    range_problems: list[str],
    nonfinite_problems: list[str],
) -> None:
    """Raise for out-of-range ids or labels (always: they are data or configuration errors) and, with
    `policy="raise"`, for non-finite values; the caller skips the batch otherwise."""
    if range_problems:
        raise ValueError(
            f"Training step {step}: the batch holds values outside their range: {'; '.join(range_problems)}. "
            "Fix the dataset or the model's num_labels / vocabulary (labels must be class or token ids, or -100 "
            "for positions to ignore)."
        )
    if nonfinite_problems and policy == "raise":
        raise NonFiniteError(
            f"Training step {step}: non-finite values (NaN or inf) in {'; '.join(nonfinite_problems)}. The step was "
            "stopped before the weights were updated. Fix the data or the teacher, or set "
            "DistillationConfig(nonfinite='skip') to skip such batches (they are counted as nonfinite_skipped in the "
            "logs)."
        )


__all__ = [
    "bad_parts",
    "describe_nonfinite_tensor",
    "describe_out_of_range",
    "loss_flags",
    "prepare_batch_checks",
    "raise_or_warn",
]
