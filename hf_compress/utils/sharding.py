"""Whole values of sharded parameters: FSDP2 `DTensor` shards and DeepSpeed ZeRO-3 partitions.

Under FSDP2 (`torch.distributed.fsdp.fully_shard`) a parameter is a `DTensor` holding one shard per rank; under
DeepSpeed ZeRO-3 it is an empty tensor whose rank-local flat partition lives in `param.ds_tensor` (and, once an
optimizer exists, in an fp32 master partition). The compression code reads whole weights (scores, checks,
checkpoints) and writes masks back shard by shard, through the helpers here:

- [`full_tensor`] / [`gathered`]: read a whole parameter (collective);
- [`shard_like`] / [`unshard_like`]: a whole tensor (a pruning mask) laid out like a parameter's local storage, and
  back;
- [`mul_`]: multiply a parameter by such a mask in place, every copy of it (ZeRO-3: the 16-bit partition and the fp32
  master partition the optimizer updates);
- [`gather_full_state_dict`] / [`unsharded_cpu_copy`]: the whole model on the main process, e.g. to save it.

Every helper that gathers or scatters is a collective: all ranks call it for the same parameters in the same order.
Hand-written glue: torch and DeepSpeed gather whole tensors (`DTensor.full_tensor`,
`deepspeed.zero.GatheredParameters`) but have no "tensor shaped like a parameter's shard" helper for masks.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def is_dtensor(tensor) -> bool:
    """Whether `tensor` is a `torch.distributed.tensor.DTensor` (an FSDP2 / tensor-parallel shard)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_zero3_param(tensor) -> bool:
    """Whether `tensor` is a DeepSpeed ZeRO-3 partitioned parameter."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_tensor")


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of `model` is an FSDP2 `DTensor` or a ZeRO-3 partition."""
    return any(is_dtensor(p) or is_zero3_param(p) for p in model.parameters())


def logical_numel(param: torch.Tensor) -> int:
    """Number of elements of the whole parameter (`ds_numel` of a ZeRO-3 partition)."""
    return int(param.ds_numel) if is_zero3_param(param) else param.numel()


def logical_shape(param: torch.Tensor) -> torch.Size:
    """Shape of the whole parameter (`ds_shape` of a ZeRO-3 partition)."""
    return torch.Size(param.ds_shape) if is_zero3_param(param) else param.shape


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Inside the block, ZeRO-3 partitioned `params` hold their whole value on every rank (a collective).

    `modifier_rank=None` is read-only; with a rank, that rank's changes are partitioned back on exit
    (`deepspeed.zero.GatheredParameters`). Other parameters (plain, DTensor) are left as they are.
    """
    zero3 = [p for p in params if is_zero3_param(p)]
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=modifier_rank):
        yield


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter on every rank: a DTensor is gathered, a ZeRO-3 partition too (a copy then);
    any other tensor is returned as it is. A collective for sharded tensors."""
    if is_zero3_param(tensor):
        with gathered([tensor]):
            return tensor.detach().clone()
    if is_dtensor(tensor):
        return tensor.full_tensor()
    return tensor


def _zero3_group(param: torch.Tensor):
    return getattr(param, "ds_process_group", None)


def _zero3_rank_and_size(param: torch.Tensor) -> tuple[int, int]:
    group = _zero3_group(param)
    return torch.distributed.get_rank(group=group), torch.distributed.get_world_size(group=group)


def _broadcast_from_first(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Rank 0's `tensor` on every rank of `group` (uint8 for bool: gloo has no bool collectives)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    buffer = tensor.to(torch.uint8).contiguous() if tensor.dtype == torch.bool else tensor.contiguous()
    src = torch.distributed.get_global_rank(group, 0) if group is not None else 0
    torch.distributed.broadcast(buffer, src=src, group=group)
    return buffer.bool() if tensor.dtype == torch.bool else buffer


def is_zero3_partition_of(tensor: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether `tensor` is a flat rank-local partition laid out like ZeRO-3 parameter `param` (see [`shard_like`])."""
    return is_zero3_param(param) and tensor.dim() == 1 and tensor.numel() == param.ds_tensor.ds_numel


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` (shaped like the whole `param`) laid out like `param`'s storage on this rank.

    - FSDP2 `DTensor`: a DTensor with the parameter's mesh and placements (rank 0's `full` is scattered);
    - ZeRO-3 partition: the flat slice of rank 0's `full` that this rank's `param.ds_tensor` holds, padded with
      zeros / False where the last partition runs past the parameter;
    - otherwise `full` on the parameter's device.
    A tensor already laid out like `param` is returned as it is (moved to its device).
    """
    if is_dtensor(param):
        if is_dtensor(full):
            return full
        from torch.distributed.tensor import distribute_tensor

        is_bool = full.dtype == torch.bool
        value = full.to(device=param.device, dtype=torch.uint8 if is_bool else full.dtype)  # gloo: no bool
        out = distribute_tensor(value, param.device_mesh, param.placements)
        return out.bool() if is_bool else out
    if is_zero3_param(param):
        local = param.ds_tensor
        if is_zero3_partition_of(full, param):
            return full.to(local.device)
        if tuple(full.shape) != tuple(param.ds_shape):
            raise ValueError(
                f"shard_like: got a tensor of shape {tuple(full.shape)} for a parameter of shape "
                f"{tuple(param.ds_shape)}."
            )
        full = _broadcast_from_first(full.to(local.device), _zero3_group(param))
        rank, _ = _zero3_rank_and_size(param)
        size = local.ds_numel
        start = rank * size
        flat = full.reshape(-1)
        part = torch.zeros(size, dtype=full.dtype, device=local.device)
        count = max(0, min(size, flat.numel() - start))
        if count:
            part[:count] = flat[start : start + count]
        return part
    return full.to(param.device)


def unshard_like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole tensor from a value laid out like `param` (the inverse of [`shard_like`]; a collective for sharded
    parameters): a DTensor is gathered, a ZeRO-3 partition is all-gathered and reshaped to the parameter's shape."""
    if is_dtensor(local):
        return local.full_tensor()
    if is_zero3_partition_of(local, param):
        _, world = _zero3_rank_and_size(param)
        is_bool = local.dtype == torch.bool
        value = local.to(torch.uint8) if is_bool else local
        parts = [torch.empty_like(value) for _ in range(world)]
        torch.distributed.all_gather(parts, value.contiguous(), group=_zero3_group(param))
        full = torch.cat(parts)[: logical_numel(param)].view(logical_shape(param))
        return full.bool() if is_bool else full
    return local


def count_nonzero(tensor: torch.Tensor, param: torch.Tensor | None = None) -> int:
    """Non-zero (True) entries of the whole tensor from a value laid out like `param` (a collective when sharded: a
    DTensor's shards, or the ZeRO-3 partitions of `param`, are summed across ranks)."""
    count = tensor.ne(0).sum()
    if is_dtensor(count):
        return int(count.full_tensor())
    if param is not None and is_zero3_partition_of(tensor, param):
        count = count.to(param.ds_tensor.device, torch.int64)
        torch.distributed.all_reduce(count, group=_zero3_group(param))
    return int(count)


def _zero3_fp32_partition(param: torch.Tensor) -> torch.Tensor | None:
    """The fp32 master partition the ZeRO-3 optimizer updates, or None (frozen parameter, no optimizer yet)."""
    if getattr(param, "_z3_optimizer", None) is None or not param.requires_grad:
        return None
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(param)


@torch.no_grad()
def mul_(param: torch.Tensor, local: torch.Tensor) -> None:
    """`param *= local` in place, with `local` laid out like `param` ([`shard_like`]).

    Under ZeRO-3 both the rank's 16-bit partition and its fp32 master partition (once an optimizer exists) are
    multiplied, so an optimizer step cannot bring back what the mask removed from the master weights.
    """
    if is_zero3_param(param):
        if not is_zero3_partition_of(local, param):
            local = shard_like(local, param)
        param.ds_tensor.mul_(local.to(param.ds_tensor.dtype))
        if param.data.numel() == logical_numel(param):
            # Whole right now (a persistent small parameter, or inside a gathered block): its whole copy is what the
            # next forward reads, and it is refreshed from the partitions only at DeepSpeed's next all-gather.
            param.data.mul_(unshard_like(local, param).view_as(param.data).to(param.dtype))
        master = _zero3_fp32_partition(param)
        if master is not None:
            from deepspeed.utils import safe_set_local_fp32_param

            safe_set_local_fp32_param(param, master * local.to(master.device, master.dtype))
        return
    param.mul_(local if local.dtype == torch.bool else local.to(param.dtype))


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, main_process_only: bool = True) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every sharded entry gathered whole, on CPU (a collective: every rank calls it).

    With `main_process_only` (default) only global rank 0 gets the tensors (other ranks an empty dict), so the
    whole model sits in one process's CPU memory. Entries are gathered one at a time: at most one whole parameter is
    on each device at once.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    keep = not main_process_only or not distributed or torch.distributed.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor):
            continue
        whole = full_tensor(value)
        if keep:
            out[name] = whole.detach().to("cpu", copy=True)
    return out


def unsharded_class(module: nn.Module) -> type[nn.Module]:
    """The module's own class under FSDP2's dynamic `FSDP<Name>` subclass (its class itself when not sharded)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return type(module)
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


@contextlib.contextmanager
def single_process_loading() -> Iterator[None]:
    """Build, load and run transformers models in this process alone, even inside a ZeRO-3 run.

    The Trainer registers its DeepSpeed config globally; while it is set, `from_pretrained` builds models under
    `deepspeed.zero.Init`, a collective that hangs when only rank 0 loads. And ZeRO-3 replaces
    `torch.nn.functional.linear` by its memory-efficient version for the rest of the process, which torchao's
    quantized weights do not support. Both are undone for the block, then restored.
    """
    import torch.nn.functional as F

    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover
        hf_deepspeed = None
    saved_config = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    if hf_deepspeed is not None:
        hf_deepspeed.unset_hf_deepspeed_config()
    saved_linear = F.linear
    zero_init = _deepspeed_module("deepspeed.runtime.zero.partition_parameters")
    original_linear = getattr(getattr(zero_init, "InsertPostInitMethodToModuleSubClasses", None), "linear_bk", None)
    if original_linear is not None:
        F.linear = original_linear
    try:
        yield
    finally:
        F.linear = saved_linear
        if hf_deepspeed is not None:
            hf_deepspeed._hf_deepspeed_config_weak_ref = saved_config


def _deepspeed_module(name: str):
    """An already imported DeepSpeed module (never imports DeepSpeed itself)."""
    import sys

    return sys.modules.get(name)


@torch.no_grad()
def unsharded_cpu_copy(model: nn.Module) -> nn.Module | None:
    """A plain CPU copy of a (possibly sharded) transformers or PEFT model, on global rank 0; `None` elsewhere.

    A collective: every rank calls it. The copy is built from the model's config on the meta device (no random
    initialization), filled with [`gather_full_state_dict`] (dtypes kept) and the model's buffers, and has the
    original classes (no FSDP2 / DeepSpeed wrapping): `save_pretrained`, PEFT's `merge_and_unload` and
    `from_pretrained` work on it as on any model.
    """
    state_dict = gather_full_state_dict(model)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        return None
    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft_config is not None and hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None:
        raise TypeError(f"unsharded_cpu_copy needs a transformers model with a config, got {type(base).__name__}.")
    with single_process_loading(), torch.device("meta"):
        copy_ = unsharded_class(base)(copy.deepcopy(config))
        if peft_config is not None:
            from peft import get_peft_model

            name = getattr(model, "active_adapter", "default")
            name = name if isinstance(name, str) else name[0]
            copy_ = get_peft_model(copy_, copy.deepcopy(peft_config[name]), adapter_name=name)
    copy_.load_state_dict(state_dict, strict=True, assign=True)
    # Buffers left out of the state dict (rotary inv_freq, ...) are whole on every rank: copy them over.
    live_buffers = dict(model.named_buffers())
    for name, buffer in list(copy_.named_buffers()):
        if buffer.is_meta and name in live_buffers:
            owner_name, _, attr = name.rpartition(".")
            owner = copy_.get_submodule(owner_name) if owner_name else copy_
            owner._buffers[attr] = live_buffers[name].detach().to("cpu", copy=True)
    still_meta = [n for n, t in list(copy_.named_parameters()) + list(copy_.named_buffers()) if t.is_meta]
    if still_meta:
        raise RuntimeError(f"unsharded_cpu_copy: no value for {still_meta[:5]}")
    if hasattr(copy_, "tie_weights"):
        copy_.tie_weights()
    return copy_.eval()
