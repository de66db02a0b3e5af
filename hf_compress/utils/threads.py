"""Choosing torch's CPU thread count for a run, and saying what was chosen: every entry point (examples, the
command line, reports) calls [`configure_threads`] once before it trains or measures."""

from __future__ import annotations

import math
import os

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else `os.cpu_count()`)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def choose_num_threads(cores: int, load: float, default: int) -> int:
    """The thread count for `cores` cores with a 1-minute load average `load`, torch's own choice being `default`.

    One thread on machines of up to 2 cores, or when the other processes already keep the cores busy (load >= cores
    - 0.5); otherwise at most the cores left idle (`cores - load`, rounded down) and never more than `default`.

    Why: OpenMP threads spin-wait for each other at every parallel region, so a thread that is descheduled by a
    competing process stalls all of them. Measured on a 2-core machine (torch 2.13): one training step of the demo's
    teacher took 0.34 s with 1 thread and 2.5 s with 2 threads while other processes used the cores; the distillation
    stage ran at 8 steps/s with 2 threads alone and 0.4 steps/s with 2 threads next to one busy process.
    """
    if cores <= 2 or load >= cores - 0.5:
        return 1
    return max(1, min(default, math.floor(cores - load)))


def configure_threads(num_threads: int | None = None, *, log: bool = True) -> int:
    """Set torch's CPU thread count for this process and log one line saying what was chosen and why.

    Args:
        num_threads (`int`, *optional*): the thread count to use. When `None`: on a GPU run, or when the user set
            `OMP_NUM_THREADS`, torch's own choice is kept; otherwise [`choose_num_threads`] decides from the cores
            this process may use and the load average (1 on machines of up to 2 cores or on busy machines).
        log (`bool`, *optional*, defaults to `True`): log the choice (WARNING level, so it shows by default).

    Returns:
        `int`: the thread count now in use (`torch.get_num_threads()`).

    >>> from hf_compress.utils.threads import configure_threads
    >>> configure_threads(1, log=False)
    1
    """
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads={num_threads!r} must be a positive integer (or None to choose).")
        torch.set_num_threads(num_threads)
        reason = "as asked"
    elif torch.cuda.is_available():
        reason = "torch's default: the model runs on the GPU"
    elif os.environ.get("OMP_NUM_THREADS"):
        reason = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    else:
        cores = available_cores()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        torch.set_num_threads(choose_num_threads(cores, load, torch.get_num_threads()))
        reason = f"{cores} cores, load average {load:.1f}"
    threads = torch.get_num_threads()
    if log:
        logger.warning(
            f"hf_compress: using {threads} CPU thread{'s' if threads != 1 else ''} for torch ({reason}); set "
            "OMP_NUM_THREADS or the entry point's --num_threads to change it."
        )
    return threads


__all__ = ["available_cores", "choose_num_threads", "configure_threads"]
