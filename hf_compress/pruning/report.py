"""Sparsity accounting: how many weights are zero, where, and whether N:M groups comply."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..utils.modules import count_parameters, find_linear_modules, unwrap_model
from .config import parse_nm_pattern
from .scoring import weight_as_out_in


@torch.no_grad()
def nm_compliant(weight_out_in: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of `m` consecutive input weights of every output row has at most `n` non-zeros."""
    out_features, in_features = weight_out_in.shape
    if in_features % m:
        return False
    groups = (weight_out_in != 0).reshape(out_features, in_features // m, m)
    return bool((groups.sum(dim=-1) <= n).all())


class SparsityReport(dict):
    """The `dict` [`sparsity_report`] returns, printed as a short summary instead of every module's entry.

    All keys stay as documented there (`report["target_sparsity"]`, `report["modules"]`, ...); `print(report)` and
    the REPL show a few lines, and `to_markdown()` gives the per-module table.
    """

    def __repr__(self) -> str:
        modules = self.get("modules", {})
        lines = [
            f"SparsityReport: {_pct(self['sparsity'])} of all {_count(self['parameters'])} parameters are zero; "
            f"targeted layers: {_pct(self['target_sparsity'])} of {_count(self['target_parameters'])} weights "
            f"({len(modules)} modules, per layer {_pct(self['min_layer_sparsity'])} to "
            f"{_pct(self['max_layer_sparsity'])})"
        ]
        if self.get("n_m_compliant") is not None:
            lines.append(f"  N:M compliant: {'yes' if self['n_m_compliant'] else 'no'}")
        return "\n".join(lines)

    __str__ = __repr__

    def _repr_markdown_(self) -> str:  # Jupyter
        return self.to_markdown()

    def to_markdown(self) -> str:
        """A Markdown table: one row per reported module (parameters, non-zeros, sparsity, N:M compliance)."""
        nm = self.get("n_m_compliant") is not None
        header = "| module | parameters | non-zero | sparsity |" + (" N:M |" if nm else "")
        lines = [repr(self), "", header, "|---|---:|---:|---:|" + ("---|" if nm else "")]
        for name, entry in self.get("modules", {}).items():
            row = f"| {name} | {entry['parameters']:,} | {entry['nonzero']:,} | {_pct(entry['sparsity'])} |"
            lines.append(row + (f" {'yes' if entry['n_m_compliant'] else 'no'} |" if nm else ""))
        return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


@torch.no_grad()
def sparsity_report(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    pattern: str | None = None,
) -> dict[str, Any]:
    """Total and per-module sparsity of a model's Linear / Conv1D weights.

    Args:
        model (`nn.Module`): the model (DDP / compile wrappers removed; PEFT base layers reported).
        target_modules, exclude_modules: the modules to report, as in [`PruningConfig`] (default: the Linear layers
            of the transformer blocks).
        pattern (`str`, *optional*): an `"N:M"` pattern whose compliance is checked for every group.

    Returns:
        [`SparsityReport`] (a `dict`, printed as a short summary; `to_markdown()` lists every module): `parameters` / `nonzero_parameters` / `sparsity` of the whole model; `target_parameters` /
        `target_nonzero` / `target_sparsity` over the reported modules; `min_layer_sparsity`,
        `max_layer_sparsity`; `n_m_compliant` (`None` without a pattern); `modules`: per module `parameters`,
        `nonzero`, `sparsity` and `n_m_compliant`.

    Example:

    ```python
    >>> report = sparsity_report(model, pattern="2:4")
    >>> report["target_sparsity"], report["n_m_compliant"]
    (0.5, True)
    ```
    """
    model = unwrap_model(model)
    nm = parse_nm_pattern(pattern) if pattern is not None else None
    modules = find_linear_modules(model, target_modules, exclude_modules)
    per_module = {}
    for name, module in modules.items():
        weight = weight_as_out_in(module)
        numel, nonzero = weight.numel(), int(torch.count_nonzero(weight))
        per_module[name] = {
            "parameters": numel,
            "nonzero": nonzero,
            "sparsity": 1 - nonzero / numel,
            "n_m_compliant": nm_compliant(weight, *nm) if nm else None,
        }
    total, nonzero_total = count_parameters(model)
    target_params = sum(v["parameters"] for v in per_module.values())
    target_nonzero = sum(v["nonzero"] for v in per_module.values())
    layer_sparsities = [v["sparsity"] for v in per_module.values()]
    return SparsityReport(
        {
            "parameters": total,
            "nonzero_parameters": nonzero_total,
            "sparsity": 1 - nonzero_total / total if total else 0.0,
            "target_parameters": target_params,
            "target_nonzero": target_nonzero,
            "target_sparsity": 1 - target_nonzero / target_params,
            "min_layer_sparsity": min(layer_sparsities),
            "max_layer_sparsity": max(layer_sparsities),
            "n_m_compliant": all(v["n_m_compliant"] for v in per_module.values()) if nm else None,
            "modules": per_module,
        }
    )
