"""Sparsity schedules keyed on optimizer steps (`TrainerState.global_step`)."""

from __future__ import annotations

import math

from .config import PruningConfig


def sparsity_at_step(config: PruningConfig, step: int) -> float:
    """Sparsity target after `step` optimizer updates (0 before `start_step`).

    `"cubic"` is Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_end - t_0))^3, which prunes fast
    while the network is redundant and slowly near the end.
    """
    final = config.target_sparsity
    if step < config.start_step:
        return 0.0
    if config.schedule == "oneshot" or step >= config.end_step or config.end_step == config.start_step:
        return final
    progress = (step - config.start_step) / (config.end_step - config.start_step)
    initial = config.initial_sparsity
    if config.schedule == "linear":
        return initial + (final - initial) * progress
    return final + (initial - final) * (1.0 - progress) ** 3


def is_pruning_step(config: PruningConfig, step: int) -> bool:
    """Whether the masks are recomputed after `step` optimizer updates."""
    if config.schedule == "oneshot":
        return step == config.start_step
    if step < config.start_step or step > config.end_step:
        return False
    return step == config.end_step or (step - config.start_step) % config.frequency == 0


def last_pruning_step_at_or_before(config: PruningConfig, step: int) -> int | None:
    """The latest pruning step <= `step` (None if pruning has not started)."""
    if step < config.start_step:
        return None
    if config.schedule == "oneshot":
        return config.start_step
    if step >= config.end_step:
        return config.end_step
    return config.start_step + (step - config.start_step) // config.frequency * config.frequency


def schedule_shortfall(config: PruningConfig, steps: int) -> tuple[int, int | None, float] | None:
    """Where a schedule ends when the run has only `steps` steps: `None` if its last pruning step fits, else
    `(last_step, reached_step, reached_sparsity)` (the step it was scheduled to end at, its last pruning step within
    the run, and the sparsity reached there). A schedule starting after the run is the caller's error to raise."""
    last = config.end_step if config.schedule != "oneshot" else config.start_step
    if last is None or last <= steps:
        return None
    reached_step = last_pruning_step_at_or_before(config, steps)
    reached = sparsity_at_step(config, reached_step) if reached_step is not None else 0.0
    return last, reached_step, reached


def nm_keep_count(config: PruningConfig, sparsity: float) -> int:
    """Weights kept per group of M for an intermediate target of a gradual N:M schedule.

    The group budget falls from M to N as the target rises to 1 - N/M (a gradual N:M schedule: 4:4 -> 3:4 -> 2:4).
    """
    n, m = config.nm
    return max(n, m - math.floor(sparsity * m + 1e-9))
