"""Pruning masks in checkpoints: written atomically with a checksum and what they should hold, verified on resume.

A resumed run must continue with exactly the masks it saved. The file `pruning_masks.safetensors` records, besides
the boolean masks, the pattern, scope, sparsity target and step of the save and every mask's kept count; its sha256
is written next to it (`pruning_masks.safetensors.sha256`). [`load_verified_masks`] refuses, naming the file and
the problem, a file that is truncated or changed, a mask of the wrong shape or dtype, a module set that differs
from the run's, and masks whose sparsity or N:M pattern is not what the run recorded.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers.utils import logging

from ..utils.checkpoints import CorruptCheckpointError, read_verified_bytes, safetensors_header, write_with_checksum
from ..utils.modules import is_conv1d
from .config import PruningConfig
from .report import nm_compliant
from .schedule import nm_keep_count

logger = logging.get_logger(__name__)

MASKS_NAME = "pruning_masks.safetensors"
MASKS_FORMAT = "hf_compress.pruning_masks"
# Overall sparsity may differ from the recorded target by rounding (per layer: at most one weight) and, for scorers
# that choose per row or per block, by a little more; a wrong or swapped file is off by far more.
SPARSITY_TOLERANCE = 0.01


def save_masks(
    folder: str | os.PathLike,
    masks: dict[str, torch.Tensor],
    config: PruningConfig,
    sparsity_target: float,
    step: int,
) -> str:
    """Write `masks` (whole, boolean, on any device) to `<folder>/pruning_masks.safetensors` with its checksum.

    Returns the path. The write is atomic: a process killed meanwhile leaves the previous file (or none).
    """
    from safetensors.torch import save

    tensors = {name: mask.detach().to(device="cpu", dtype=torch.bool).contiguous() for name, mask in masks.items()}
    metadata = {
        "format": MASKS_FORMAT,
        "version": "1",
        "pattern": str(config.pattern),
        "scope": str(config.scope),
        "sparsity_target": repr(float(sparsity_target)),
        "step": str(int(step)),
        "kept": json.dumps({name: int(t.sum()) for name, t in tensors.items()}, sort_keys=True),
    }
    path = os.path.join(os.fspath(folder), MASKS_NAME)
    write_with_checksum(path, save(tensors, metadata=metadata))
    return path


def _expected_overall_sparsity(config: PruningConfig, target: float) -> float:
    if config.nm is None:
        return float(target)
    return 1.0 - nm_keep_count(config, target) / config.nm[1]


def load_verified_masks(
    path: str | os.PathLike,
    modules: dict[str, nn.Module],
    config: PruningConfig,
    sparsity_target: float | None,
) -> dict[str, torch.Tensor]:
    """The masks of `path`, after checking them against the run: `modules` (name -> pruned module), its `config` and
    the `sparsity_target` recorded in the checkpoint's trainer state.

    Raises:
        CorruptCheckpointError: naming the file and the problem.
    """
    from safetensors.torch import load

    path = os.fspath(path)
    data, verified = read_verified_bytes(path)
    header = safetensors_header(data, name=path)  # truncation / garbage, before safetensors' own (unnamed) errors
    try:
        loaded = load(data)
    except Exception as err:  # safetensors raises its own SafetensorError type
        raise CorruptCheckpointError(f"{path}: not a readable safetensors file ({err}).") from None
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != MASKS_FORMAT:
        logger.warning(
            f"{path} has no hf_compress metadata (written by an older version or by hand): checking shapes, dtypes, "
            "sparsity and pattern only."
        )
        metadata = {}
    elif not verified:
        logger.warning(f"{path} has no checksum file next to it: checking shapes, dtypes, sparsity and pattern only.")

    if set(loaded) != set(modules):
        differ = sorted(set(loaded) ^ set(modules))
        raise CorruptCheckpointError(
            f"{path} holds masks for other modules than this run prunes (config or model changed): "
            f"{differ[:5]}{' ...' if len(differ) > 5 else ''}."
        )
    if metadata:
        for key, value in (("pattern", config.pattern), ("scope", config.scope)):
            if metadata.get(key) != str(value):
                raise CorruptCheckpointError(
                    f"{path} was saved with {key}={metadata.get(key)!r} but this run prunes with {key}={value!r}."
                )
        recorded_target = float(metadata["sparsity_target"])
        if sparsity_target is not None and abs(recorded_target - sparsity_target) > 1e-6:
            raise CorruptCheckpointError(
                f"{path} records sparsity target {recorded_target:g} but the checkpoint's trainer state records "
                f"{sparsity_target:g}: the mask file belongs to another step or run."
            )
    recorded_kept = json.loads(metadata["kept"]) if metadata else {}

    keep_per_group = nm_keep_count(config, sparsity_target or 0.0) if config.nm is not None else None
    masks, kept_total, numel_total = {}, 0, 0
    for name, module in modules.items():
        mask = loaded[name]
        expected_shape = tuple(module.weight.shape)  # a DTensor's shape is the whole weight's, as saved
        if tuple(mask.shape) != expected_shape:
            raise CorruptCheckpointError(
                f"{path}: the mask of {name!r} has shape {tuple(mask.shape)} but the weight has {expected_shape}."
            )
        if mask.dtype != torch.bool:
            raise CorruptCheckpointError(f"{path}: the mask of {name!r} has dtype {mask.dtype}; masks are torch.bool.")
        kept = int(mask.sum())
        if name in recorded_kept and recorded_kept[name] != kept:
            raise CorruptCheckpointError(
                f"{path}: the mask of {name!r} keeps {kept} weights but {recorded_kept[name]} were recorded when it "
                "was saved."
            )
        if keep_per_group is not None:
            out_in = mask.t() if is_conv1d(module) else mask
            if not nm_compliant(out_in, keep_per_group, config.nm[1]):
                raise CorruptCheckpointError(
                    f"{path}: the mask of {name!r} keeps more than {keep_per_group} of some group of "
                    f"{config.nm[1]} weights: it does not follow pattern={config.pattern!r} at this step."
                )
        kept_total += kept
        numel_total += mask.numel()
        masks[name] = mask
    if sparsity_target is not None and numel_total:
        sparsity = 1.0 - kept_total / numel_total
        expected = _expected_overall_sparsity(config, sparsity_target)
        if abs(sparsity - expected) > SPARSITY_TOLERANCE:
            raise CorruptCheckpointError(
                f"{path}: the masks have sparsity {sparsity:.4f} but the checkpoint's trainer state records a target "
                f"of {expected:.4f}: the file does not hold this run's masks."
            )
    return masks


__all__ = ["MASKS_NAME", "load_verified_masks", "save_masks"]
