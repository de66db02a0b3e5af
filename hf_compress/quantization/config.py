"""Configuration of quantization-aware training (QAT)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..utils.validation import check_choice, check_int, check_patterns
from ..utils.validation import did_you_mean as _did_you_mean

# Scheme name -> (weight bits, activation quantization, default group size; None means per output channel).
QAT_SCHEMES: dict[str, tuple[int, bool, int | None]] = {
    "int8-dynamic-activation-int4-weight": (4, True, 32),
    "int8-dynamic-activation-int8-weight": (8, True, None),
    "int4-weight-only": (4, False, 32),
    "int8-weight-only": (8, False, None),
}


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """` Did you mean 'x'?` for the closest choice, or an empty string."""
    return _did_you_mean(value, choices)


@dataclass
class QATConfig:
    """What quantization-aware training simulates, and on which layers.

    Quantization-aware training (Jacob et al., 2018, "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference"; torchao's QAT recipe for LLMs) trains with *fake* quantization: the forward
    pass rounds weights (and, for dynamic-activation schemes, activations) to the target integer grid while the
    backward pass lets gradients through unchanged (straight-through estimator), so the float weights learn to sit
    where rounding hurts least. The fake quantizers are torchao's (`torchao.quantization.qat`); this config only
    names the scheme and the layers.

    Args:
        scheme (`str`, *optional*, defaults to `"int8-dynamic-activation-int4-weight"`):
            One of `"int8-dynamic-activation-int4-weight"` (torchao's 8da4w: int8 per-token dynamic activations,
            int4 grouped symmetric weights), `"int8-dynamic-activation-int8-weight"`, `"int4-weight-only"`
            (int4 grouped symmetric weights) and `"int8-weight-only"` (int8 per-channel weights, or grouped if
            `group_size` is given).
        group_size (`int`, *optional*):
            Number of consecutive input features sharing one weight scale (>= 2). Defaults to 32 for the int4 schemes
            and to one scale per output channel for the int8 schemes. Must divide the `in_features` of every targeted
            layer.
        target_modules (`str` or `list[str]`, *optional*):
            PEFT-style names or regexes of the `nn.Linear` layers to quantize. Defaults to every Linear inside the
            transformer blocks (embeddings and output heads stay in full precision).
        exclude_modules (`str` or `list[str]`, *optional*): names or regexes removed from the selection.

    Example:

    ```python
    >>> from hf_compress import QATConfig
    >>> config = QATConfig(scheme="int4-weight-only", group_size=32)
    >>> config.weight_bits
    4
    ```
    """

    scheme: str = field(
        default="int8-dynamic-activation-int4-weight",
        metadata={"help": f"QAT scheme, one of {sorted(QAT_SCHEMES)}."},
    )
    group_size: int | None = field(
        default=None,
        metadata={
            "help": "Input features per weight scale; defaults to 32 for int4 schemes and per-channel for int8. "
            "Must divide in_features of every targeted layer."
        },
    )
    # `list[str] | None | str` in this order: HfArgumentParser makes these list flags (`--target_modules q v`).
    target_modules: list[str] | None | str = field(
        default=None,
        metadata={"help": "Names/regexes of the Linear layers to quantize (default: Linear layers in the blocks)."},
    )
    exclude_modules: list[str] | None | str = field(
        default=None, metadata={"help": "Names/regexes of Linear layers to leave in full precision."}
    )

    def __post_init__(self):
        check_choice("scheme", self.scheme, list(QAT_SCHEMES))
        if self.group_size is None:
            self.group_size = QAT_SCHEMES[self.scheme][2]
        else:
            # torchao's grouped fake quantizers need at least 2 input features per scale (they assert it).
            self.group_size = check_int("group_size", self.group_size, low=2)
        self.target_modules = check_patterns("target_modules", self.target_modules)
        self.exclude_modules = check_patterns("exclude_modules", self.exclude_modules)

    @property
    def weight_bits(self) -> int:
        return QAT_SCHEMES[self.scheme][0]

    @property
    def quantizes_activations(self) -> bool:
        return QAT_SCHEMES[self.scheme][1]

    def to_torchao_base_config(self) -> Any:
        """The torchao post-training config this scheme converts to (and from which torchao infers its fake quantizers).

        The `Intx*` configs are used because their kernels run on CPU as well as GPU (torchao's
        `Int4WeightOnlyConfig` needs the CUDA-only `mslk` kernels to convert) and because transformers' `TorchAoConfig`
        serializes them.
        """
        import torch
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerAxis, PerGroup

        weight_dtype = torch.int4 if self.weight_bits == 4 else torch.int8
        granularity = PerGroup(self.group_size) if self.group_size is not None else PerAxis(0)
        if self.quantizes_activations:
            return Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=granularity)
        return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=granularity)
