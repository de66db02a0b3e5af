"""The output head of a causal LM, as the fused distillation loss needs it: its input and its weight, no logits.

`DistillationTrainer` runs the student and the teacher through their own `forward` (so DDP, FSDP2, PEFT and
quantized layers behave as usual) with a forward pre-hook on the output head (`get_output_embeddings()`): the hook
keeps the head's input, the final hidden states, and lets the head project only the last position, so neither
model builds its (batch x sequence x vocabulary) logits. The loss then projects the hidden states chunk by chunk
(`fused_linear_distillation_loss`). Models whose forward changes the logits after the head are handled when their
config says how (`logit_scale`, `logits_scaling`, `final_logit_softcapping`, ...), and checked once against the
model's own logits for the last position; anything else falls back to the materialised path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedHead(Exception):
    """The fused loss cannot use this head (the message says why); the trainer falls back to full logits."""


@dataclass
class OutputHead:
    """A causal LM's output projection and the post-processing its forward applies to the logits."""

    module: nn.Module
    logit_scale: float = 1.0
    logit_softcap: float | None = None

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The logits the model's forward would return for `hidden` (used once, on one position, as a check)."""
        from .losses import _matmul_dtype

        dtype = _matmul_dtype(hidden, weight)
        logits = F.linear(hidden.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None)
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP, torch.compile, a DeepSpeed engine and PEFT."""
    from ..utils.modules import unwrap_model

    while True:
        model = unwrap_model(model)
        if type(model).__name__ == "DeepSpeedEngine" and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
            continue
        get_base = getattr(model, "get_base_model", None)  # PEFT
        return get_base() if callable(get_base) else model


def _logit_postprocessing(config: Any) -> tuple[float, float | None]:
    """(scale, softcap) that the model's forward applies after the head, read from its (text) config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = None
    for key in ("logit_scale", "output_multiplier", "lm_head_multiplier"):  # Cohere, Muse, Falcon-H1
        if getattr(config, key, None) is not None:
            scale = float(getattr(config, key))
            break
    if scale is None and getattr(config, "logits_scaling", None) is not None:  # Granite divides, HyperCLOVA X not
        value = float(config.logits_scaling)
        scale = value if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / value
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    return (1.0 if scale is None else scale), (float(softcap) if softcap else None)


def find_output_head(model: nn.Module) -> OutputHead:
    """The output head of `model` (any wrapper), or `UnsupportedHead` saying why the fused loss cannot use it."""
    base = _unwrap(model)
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise UnsupportedHead(f"{type(base).__name__} has no output head (get_output_embeddings() is None)")
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        if isinstance(head, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            raise UnsupportedHead(
                f"the output head of {type(base).__name__} is wrapped by a PEFT adapter ({type(head).__name__}: "
                "lm_head in target_modules or modules_to_save)"
            )
    except ImportError:
        pass
    # nn.Linear's own forward (also under FSDP2, whose FSDPLinear class only adds hooks), or bitsandbytes (read
    # through its own kernel). A Linear subclass with its own forward (fake quantization for QAT, custom layers)
    # may compute something else than `hidden @ weight.T + bias`.
    if not isinstance(head, nn.Linear) or not (
        type(head).forward is nn.Linear.forward or type(head).__module__.startswith("bitsandbytes.")
    ):
        raise UnsupportedHead(
            f"the output head of {type(base).__name__} is a {type(head).__module__}.{type(head).__name__}, not a "
            "plain or bitsandbytes nn.Linear"
        )
    scale, softcap = _logit_postprocessing(getattr(base, "config", None))
    return OutputHead(head, scale, softcap)


def head_parameters(head: OutputHead, *, student: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(weight, bias)` of the head as plain tensors, read after the model's forward.

    The teacher's head is gathered where it is sharded (FSDP2 `DTensor`: `full_tensor()`) and dequantized where it
    is quantized (bitsandbytes 4/8-bit, torchao). A student head that is still
    sharded after the forward is refused: its gradient would bypass FSDP2's reduce-scatter.
    """
    module = head.module
    weight, bias = module.weight, module.bias
    if hasattr(weight, "ds_id"):
        raise UnsupportedHead("the output head is partitioned by DeepSpeed ZeRO-3")
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        if student:
            raise UnsupportedHead(
                "the student's output head is still sharded (FSDP2 DTensor) after its forward; its gradient would "
                "not go through FSDP's reduce-scatter (shard it with reshard_after_forward=False, as accelerate does)"
            )
        with torch.no_grad():
            weight = weight.full_tensor()
            bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    quantized = type(weight).__name__ in ("Params4bit", "Int8Params") or type(weight).__module__.startswith("torchao")
    if quantized:
        if student and weight.requires_grad:
            raise UnsupportedHead("the student's output head is quantized and trainable")
        with torch.no_grad():
            if bias is None:
                # The head applied to the identity gives its weight as its own kernel computes it (bitsandbytes,
                # torchao, whatever layout the quantized data is in, e.g. bitsandbytes' CPU repacking).
                eye = torch.eye(module.in_features, device=_device_of(module), dtype=_compute_dtype(module))
                weight = module(eye).t()
            else:
                from peft.utils.integrations import dequantize_module_weight

                weight = dequantize_module_weight(module)
    return weight, bias


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _compute_dtype(module: nn.Module) -> torch.dtype:
    dtype = getattr(module, "compute_dtype", None)  # bitsandbytes
    if isinstance(dtype, torch.dtype):
        return dtype
    quant_state = getattr(module.weight, "quant_state", None)
    return getattr(quant_state, "dtype", None) or torch.get_default_dtype()


class HeadInputCapture:
    """Context manager: while open, the head's input is kept in `.hidden` and the head projects only the last
    position (so the model returns logits of shape (batch, 1, vocabulary)).

    >>> with HeadInputCapture(model.lm_head) as captured:  # doctest: +SKIP
    ...     out = model(input_ids)
    >>> captured.hidden.shape  # doctest: +SKIP
    torch.Size([batch, seq, hidden])
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.hidden: torch.Tensor | None = None
        self.calls = 0

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("input")
        self.calls += 1
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return None  # not the (batch, seq, hidden) input we know: leave it alone, `problem()` reports it
        self.hidden = hidden
        last = hidden[:, -1:, :]
        if args:
            return (last, *args[1:]), kwargs
        return args, {**kwargs, "input": last}

    def __enter__(self) -> HeadInputCapture:
        self.hidden, self.calls = None, 0
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def problem(self, who: str, positions: torch.Size) -> str | None:
        """Why the captured input cannot be used (None when it can): `positions` is (batch, seq) of the inputs."""
        if self.calls != 1:
            return f"the {who}'s output head ran {self.calls} times in one forward (expected once)"
        if self.hidden is None:
            return f"the {who}'s output head did not receive (batch, seq, hidden) hidden states"
        if tuple(self.hidden.shape[:2]) != tuple(positions):
            return (
                f"the {who}'s output head saw {tuple(self.hidden.shape[:2])} positions for inputs of "
                f"{tuple(positions)} (e.g. PEFT prompt learning adds virtual tokens)"
            )
        return None


def logits_match(head: OutputHead, captured: torch.Tensor, logits: Any, weight, bias) -> str | None:
    """Compare the model's logits for the last position with `head.logits` of its captured input.

    Run once per trainer (one host synchronisation): it catches a forward that changes the logits in a way the
    config does not describe. Returns None when they agree, else the reason.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[1] != 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        return f"the model returned logits of shape {shape} with only the last position projected"
    with torch.no_grad():
        ours = head.logits(captured[:, -1:, :].detach(), weight, bias).float()
        theirs = logits.detach().float()
        if ours.shape[-1] != theirs.shape[-1]:
            return f"its logits have {theirs.shape[-1]} columns but the head has {ours.shape[-1]} rows"
        tolerance = 1e-2 * theirs.abs().max().clamp_min(1.0)
        if not bool(((ours - theirs).abs().max() <= tolerance).item()):
            return (
                "its forward changes the logits after the output head in a way its config does not describe "
                "(logit_scale / logits_scaling / final_logit_softcapping)"
            )
    return None
