"""Pruning: unstructured and N:M (2:4) sparsity, as plain functions and as a Trainer callback.

`structured` (heads / neurons) is imported on demand, so this package imports without it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .callback import PruningCallback
from .config import PruningConfig
from .lora import merge_lora_keep_sparsity
from .report import sparsity_report
from .schedule import sparsity_at_step
from .scoring import Scorer, available_scorers, register_scorer
from .semi_structured import (
    SparseInferenceConfig,
    SparseInferencePlan,
    accelerate_sparse_inference_,
    plan_sparse_inference,
    to_semi_structured_sparse_,
)
from .unstructured import compute_masks, make_pruning_permanent_, prune_

__all__ = [
    "PruningCallback",
    "PruningConfig",
    "Scorer",
    "SparseInferenceConfig",
    "SparseInferencePlan",
    "accelerate_sparse_inference_",
    "available_scorers",
    "compute_masks",
    "make_pruning_permanent_",
    "merge_lora_keep_sparsity",
    "plan_sparse_inference",
    "prune_",
    "register_scorer",
    "sparsity_at_step",
    "sparsity_report",
    "to_semi_structured_sparse_",
]

_LAZY = {"StructuredPruningConfig": "structured", "structured_prune_": "structured"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
