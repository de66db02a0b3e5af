"""Small guards the trainer and the callbacks share: non-finite checks, callback state slots and bounded
distributed waits."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator, Mapping

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


class NonFiniteError(ValueError):
    """A NaN or inf where training needs finite numbers (an input, the teacher's output, a loss part, a weight).

    The message names the part and the training step."""


def nonfinite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in `tensors` that hold a NaN or an inf, in one host sync.

    Each tensor is reduced to one flag on its own device (an fp32 sum: a NaN or inf anywhere makes it non-finite;
    finite values cannot overflow fp32 at the sizes of weights or activations), and the flags travel to the host
    together."""
    names, flags = [], []
    for name, tensor in tensors.items():
        if tensor is None or not torch.is_tensor(tensor) or not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor shard: this rank's part
        names.append(name)
        flags.append(torch.isfinite(local.detach().sum(dtype=torch.float32)).logical_not().reshape(1))
    if not flags:
        return []
    bad = torch.cat([flag.to(flags[0].device) for flag in flags]).tolist()
    return [name for name, is_bad in zip(names, bad) if is_bad]


def check_finite_weights(modules: Mapping[str, torch.nn.Module], what: str, step: int) -> None:
    """Raise [`NonFiniteError`] naming the modules whose `weight` holds a NaN or inf (one host sync)."""
    bad = nonfinite_names({name: getattr(module, "weight", None) for name, module in modules.items()})
    if bad:
        raise NonFiniteError(
            f"{what} at step {step}: the weights of {len(bad)} module(s) hold NaN or inf ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}). Training diverged before this point (lower the learning rate, "
            "check the data for NaN/inf, or resume from an earlier checkpoint)."
        )


# ---------------------------------------------------------------------------------------------- callback state
def ensure_callback_state_slot(state, callback) -> None:
    """Make sure `state.stateful_callbacks` has an entry for `callback`'s class.

    `Trainer._save_checkpoint` indexes `stateful_callbacks[name]` and raises a bare `KeyError` at the next save when
    a resumed checkpoint was written without this callback (or its entry was removed); an entry created here is
    filled at that save."""
    stateful = getattr(state, "stateful_callbacks", None)
    if stateful is None:
        state.stateful_callbacks = stateful = {}
    stateful.setdefault(type(callback).__name__, {})


def saved_callback_state(state, callback) -> dict | None:
    """This callback's entry in a resumed `TrainerState` (the first one if several were saved), or None."""
    saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(callback).__name__)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    return saved or None


# ---------------------------------------------------------------------------------------------- distributed waits
def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def honour_ddp_timeout(args) -> None:
    """Give the default process group the run's `ddp_timeout`.

    transformers passes `ddp_timeout` to the process group it creates, except with `use_cpu=True` (gloo on CPU),
    where the 30-minute default stays: a stalled rank then blocks the others for half an hour. Setting it here
    bounds every later collective of the run (the Trainer's and ours). No-op outside torch.distributed."""
    seconds = getattr(args, "ddp_timeout", None)
    if not seconds or not _distributed():
        return
    from torch.distributed import distributed_c10d

    set_timeout = getattr(distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is None:  # older torch: the group keeps the timeout it was created with
        return
    try:
        set_timeout(datetime.timedelta(seconds=float(seconds)))
    except (RuntimeError, ValueError) as err:  # a backend that does not support it keeps its own timeout
        logger.debug(f"ddp_timeout={seconds} could not be applied to the process group: {err}")


def check_ranks_alive(timeout_s: float | None, what: str) -> None:
    """With gloo, a `monitored_barrier` that fails within `timeout_s` naming the ranks that did not arrive, instead
    of a collective that waits for a stalled rank. No-op for other backends (NCCL has its own watchdog) and outside
    torch.distributed."""
    if not _distributed() or torch.distributed.get_backend() != "gloo":
        return
    timeout = datetime.timedelta(seconds=float(timeout_s)) if timeout_s else None
    try:
        torch.distributed.monitored_barrier(timeout=timeout, wait_all_ranks=True)
    except RuntimeError as err:
        raise TimeoutError(
            f"{what}: not every rank arrived within ddp_timeout={timeout_s} s (a rank is stalled or died): {err}"
        ) from err


@contextlib.contextmanager
def bounded_collectives(timeout_s: float | None, what: str) -> Iterator[None]:
    """Turn a timed-out collective inside the block into a `TimeoutError` that says what was being done."""
    try:
        yield
    except RuntimeError as err:
        message = str(err).lower()
        if _distributed() and ("timed out" in message or "timeout" in message):
            raise TimeoutError(
                f"{what}: a collective did not complete within ddp_timeout={timeout_s} s (a rank is stalled or "
                f"died): {err}"
            ) from err
        raise


__all__ = [
    "NonFiniteError",
    "bounded_collectives",
    "check_finite_weights",
    "check_ranks_alive",
    "ensure_callback_state_slot",
    "honour_ddp_timeout",
    "nonfinite_names",
    "saved_callback_state",
]
