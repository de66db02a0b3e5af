"""Configuration of unstructured and N:M (semi-structured) pruning."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ..utils.validation import (
    InvalidArgumentTypeError,
    check_choice,
    check_int,
    check_number,
    check_patterns,
)

_SCOPES = ("layer", "row", "global")
_SCHEDULES = ("oneshot", "linear", "cubic")
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm_pattern(pattern: str) -> tuple[int, int] | None:
    """`"2:4"` -> `(2, 4)`, `"unstructured"` -> `None`. Raises `ValueError` for anything else."""
    if pattern == "unstructured":
        return None
    match = _NM_RE.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(
            f"pattern={pattern!r} is not allowed: use 'unstructured' or an 'N:M' string such as '2:4' or '4:8' "
            "(at most N of every M consecutive input weights survive)."
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(
            f"pattern={pattern!r} is not allowed: an N:M pattern needs 0 < N < M (for example '2:4' or '4:8')."
        )
    return n, m


@dataclass
class PruningConfig:
    """What to prune, how much and when: the configuration shared by [`prune_`] and [`PruningCallback`].

    Args:
        method (`str`, *optional*, defaults to `"magnitude"`):
            How weights are scored; the lowest-scored are pruned. `"magnitude"` is |W| (L1); `"wanda"` is
            |W| x the L2 norm of the layer's input feature over calibration tokens (Sun et al. 2023,
            "A Simple and Effective Pruning Approach for Large Language Models"); `"sparsegpt"` chooses the mask
            and updates the kept weights to compensate (second-order OBS reconstruction, Frantar & Alistarh 2023,
            "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"), block by block. Other scorers
            can be added with [`~hf_compress.pruning.scoring.register_scorer`].
        sparsity (`float`, *optional*):
            Final fraction of targeted weights set to zero, in [0, 1). Defaults to 0.5 for `"unstructured"`; for an
            N:M pattern it is 1 - N/M and may be left unset.
        scope (`str`, *optional*):
            Which weights compete for survival. `"layer"`: all weights of a layer (every targeted layer reaches
            `sparsity`); `"row"`: the weights of each output row (every output neuron keeps the same fraction of its
            inputs); `"global"`: all targeted weights (one threshold, layers end with different sparsities).
            Defaults to the method's own choice: `"row"` for `"wanda"` (the paper's per-output comparison group,
            which it found better than per-layer on LLMs), `"layer"` for `"magnitude"`; `"sparsegpt"`
            selects per block of 128 input columns as in its reference implementation (`"global"` is refused).
            N:M patterns are always per group of M inputs of a row.
        pattern (`str`, *optional*, defaults to `"unstructured"`):
            `"unstructured"` or `"N:M"` (e.g. `"2:4"`): in every group of M consecutive input weights of an output
            row at most N survive (GPT-2 `Conv1D` weights are transposed; groups still run along the input).
        target_modules (`str` or `list[str]`, *optional*):
            Names or regexes of modules to prune, as in PEFT. Defaults to every Linear/Conv1D inside the
            transformer blocks (embeddings, heads and norms are left alone).
        exclude_modules (`str` or `list[str]`, *optional*): names or regexes removed from the targets.
        schedule (`str`, *optional*, defaults to `"oneshot"`):
            `"oneshot"` prunes to `sparsity` at `start_step`; `"linear"` and `"cubic"` (Zhu & Gupta 2017, "To prune,
            or not to prune") raise the sparsity from `initial_sparsity` at `start_step` to `sparsity` at
            `end_step`, every `frequency` optimizer steps.
        initial_sparsity (`float`, *optional*, defaults to 0.0): sparsity of the first gradual step.
        start_step (`int`, *optional*, defaults to 0): optimizer step of the first pruning (0 = before training).
        end_step (`int`, *optional*): optimizer step of the last pruning; required for `"linear"`/`"cubic"`.
        frequency (`int`, *optional*, defaults to 10): optimizer steps between two pruning updates.
        num_calibration_batches (`int`, *optional*, defaults to 8): calibration batches used by `"wanda"` and
            `"sparsegpt"`.

    Example:

    ```python
    >>> from hf_compress import PruningConfig
    >>> config = PruningConfig(method="magnitude", sparsity=0.5, schedule="cubic", start_step=0, end_step=100)
    >>> config.target_sparsity
    0.5
    >>> PruningConfig(pattern="2:4").target_sparsity
    0.5
    ```
    """

    method: str = field(default="magnitude", metadata={"help": "Scoring method: 'magnitude', 'wanda' or 'sparsegpt'."})
    sparsity: float | None = field(
        default=None,
        metadata={"help": "Final fraction of targeted weights set to zero, in [0, 1). Default 0.5, or 1-N/M."},
    )
    scope: str | None = field(
        default=None,
        metadata={
            "help": "'layer' (each weight), 'row' (each output row) or 'global' (one threshold); default: the "
            "method's own ('row' for wanda, 'layer' for magnitude)."
        },
    )
    pattern: str = field(default="unstructured", metadata={"help": "'unstructured' or an 'N:M' string like '2:4'."})
    # `list[str] | None | str` in this order: HfArgumentParser makes these list flags (`--target_modules q v`).
    target_modules: list[str] | None | str = field(
        default=None, metadata={"help": "Module names or regexes to prune (default: Linear layers of the blocks)."}
    )
    exclude_modules: list[str] | None | str = field(
        default=None, metadata={"help": "Module names or regexes never pruned."}
    )
    schedule: str = field(default="oneshot", metadata={"help": "'oneshot', 'linear' or 'cubic' (Zhu & Gupta)."})
    initial_sparsity: float = field(default=0.0, metadata={"help": "Sparsity of the first gradual pruning step."})
    start_step: int = field(default=0, metadata={"help": "Optimizer step of the first pruning (0: before training)."})
    end_step: int | None = field(default=None, metadata={"help": "Optimizer step of the last pruning."})
    frequency: int = field(default=10, metadata={"help": "Optimizer steps between pruning updates."})
    num_calibration_batches: int = field(
        default=8, metadata={"help": "Calibration batches used by 'wanda' and 'sparsegpt'."}
    )

    def __post_init__(self):
        from .scoring import available_scorers

        check_choice("method", self.method, available_scorers())
        if self.scope is None:
            from .scoring import get_scorer_class

            self.scope = get_scorer_class(self.method).default_scope
        check_choice("scope", self.scope, _SCOPES)
        check_choice("schedule", self.schedule, _SCHEDULES)
        if not isinstance(self.pattern, str):
            raise InvalidArgumentTypeError(
                f"pattern={self.pattern!r} is not allowed: it must be 'unstructured' or an 'N:M' string such as "
                f"'2:4', got {type(self.pattern).__name__}."
            )
        nm = parse_nm_pattern(self.pattern)
        self.sparsity = check_number(
            "sparsity", self.sparsity, low=0.0, high=1.0, high_inclusive=False, allow_none=True
        )
        if nm is not None:
            n, m = nm
            if self.sparsity is not None and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(
                    f"sparsity={self.sparsity!r} does not match pattern={self.pattern!r}, whose sparsity is "
                    f"1 - {n}/{m} = {1 - n / m:g}: leave sparsity unset with an N:M pattern."
                )
            if self.scope == "global":
                raise ValueError(
                    f"scope={self.scope!r} is not allowed with pattern={self.pattern!r}: N:M sparsity is decided "
                    "per group of M weights, use scope='layer' (or leave it unset)."
                )
        if self.method == "sparsegpt" and self.scope == "global":
            raise ValueError(
                "scope='global' is not allowed with method='sparsegpt': SparseGPT chooses its mask per block of "
                "input columns while it reconstructs each layer; use scope='layer' (or leave it unset)."
            )
        self.target_modules = check_patterns("target_modules", self.target_modules)
        self.exclude_modules = check_patterns("exclude_modules", self.exclude_modules)
        self.initial_sparsity = check_number(
            "initial_sparsity", self.initial_sparsity, low=0.0, high=1.0, high_inclusive=False
        )
        if self.initial_sparsity > self.target_sparsity:
            raise ValueError(
                f"initial_sparsity={self.initial_sparsity!r} is larger than the final sparsity "
                f"{self.target_sparsity!r}: it must be smaller or equal."
            )
        self.start_step = check_int("start_step", self.start_step, low=0)
        self.end_step = check_int("end_step", self.end_step, allow_none=True)
        if self.end_step is not None and self.end_step < self.start_step:
            raise ValueError(
                f"end_step={self.end_step!r} is not allowed: it must be an integer >= start_step={self.start_step}."
            )
        if self.schedule in ("linear", "cubic") and self.end_step is None:
            raise ValueError(f"end_step=None is not allowed with schedule={self.schedule!r}: give the last step.")
        self.frequency = check_int("frequency", self.frequency, low=1)
        self.num_calibration_batches = check_int("num_calibration_batches", self.num_calibration_batches, low=1)

    @property
    def nm(self) -> tuple[int, int] | None:
        """`(N, M)` for an N:M pattern, `None` for unstructured."""
        return parse_nm_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        """The final sparsity: `sparsity`, 1 - N/M for an N:M pattern, or 0.5 by default."""
        nm = self.nm
        if nm is not None:
            return 1 - nm[0] / nm[1]
        return 0.5 if self.sparsity is None else float(self.sparsity)

    @property
    def requires_calibration(self) -> bool:
        from .scoring import get_scorer_class

        return get_scorer_class(self.method).requires_calibration

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
