"""Distillation losses as pure functions of logits (and hidden states).

Every function takes student and teacher tensors whose last dimension is the distribution (classes or vocabulary),
an optional boolean `mask` over the leading dimensions (True = this position counts), and a `reduction`:
`"none"` (one value per position), `"sum"` over the kept positions, or `"mean"` over the kept positions.
The trainer uses `"sum"` and divides by the number of items in the whole (accumulated) batch itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "mse")
HIDDEN_LOSS_TYPES = ("mse", "cosine")
REDUCTIONS = ("none", "sum", "mean")


def _reduce(per_position: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; allowed: {list(REDUCTIONS)}.")
    if mask is not None:
        mask = mask.to(torch.bool)
        if mask.shape != per_position.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the positions have {tuple(per_position.shape)}.")
        per_position = per_position.masked_fill(~mask, 0.0)
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    count = mask.sum() if mask is not None else per_position.new_tensor(per_position.numel())
    return total / count.clamp_min(1)


def _check_shapes(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}."
        )


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    return F.log_softmax(logits.float() / temperature, dim=-1)


def forward_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, times T² (Hinton et al., 2015).

    The T² factor keeps the soft-target gradients on the same scale as the hard-label ones when T changes.
    """
    _check_shapes(student_logits, teacher_logits)
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    per_position = (t.exp() * (t - s)).sum(-1) * temperature**2
    return _reduce(per_position, mask, reduction)


def reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(student || teacher) on temperature-softened distributions (mode-seeking; Gu et al., 2023, MiniLLM)."""
    _check_shapes(student_logits, teacher_logits)
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    per_position = (s.exp() * (s - t)).sum(-1)
    return _reduce(per_position, mask, reduction)


def jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence (Agarwal et al., 2024, GKD).

    With the mixture M = beta * P_teacher + (1 - beta) * P_student:
    JSD_beta = beta * KL(P_teacher || M) + (1 - beta) * KL(P_student || M).
    `beta=0` is defined as forward KL(teacher || student) and `beta=1` as reverse KL(student || teacher), the
    directions the mixture tends to at each end; `beta=0.5` is the symmetric JSD.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1].")
    _check_shapes(student_logits, teacher_logits)
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    if beta == 0.0:
        per_position = (t.exp() * (t - s)).sum(-1)
    elif beta == 1.0:
        per_position = (s.exp() * (s - t)).sum(-1)
    else:
        log_m = torch.logsumexp(
            torch.stack([t + torch.log(torch.tensor(beta)), s + torch.log1p(torch.tensor(-beta))]), 0
        )
        kl_t = (t.exp() * (t - log_m)).sum(-1)
        kl_s = (s.exp() * (s - log_m)).sum(-1)
        per_position = beta * kl_t + (1.0 - beta) * kl_s
    return _reduce(per_position, mask, reduction)


def mse_logits_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean squared error between raw logits, averaged over the classes of each position (Kim et al., 2021)."""
    _check_shapes(student_logits, teacher_logits)
    per_position = (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)
    return _reduce(per_position, mask, reduction)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_type: str = "forward_kl",
    temperature: float = 2.0,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Dispatch to one of `forward_kl`, `reverse_kl`, `jsd` or `mse` (see each function)."""
    if loss_type == "forward_kl":
        return forward_kl_loss(student_logits, teacher_logits, temperature, mask, reduction)
    if loss_type == "reverse_kl":
        return reverse_kl_loss(student_logits, teacher_logits, temperature, mask, reduction)
    if loss_type == "jsd":
        return jsd_loss(student_logits, teacher_logits, temperature, beta, mask, reduction)
    if loss_type == "mse":
        return mse_logits_loss(student_logits, teacher_logits, mask, reduction)
    raise ValueError(f"loss_type={loss_type!r} is not supported; allowed: {list(LOSS_TYPES)}.")


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    loss_type: str = "mse",
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-token distance between (projected) student and teacher hidden states of shape (batch, seq, width).

    `mse` averages the squared error over the width (TinyBERT, Jiao et al., 2020); `cosine` is 1 - cosine
    similarity (DistilBERT's cosine embedding loss, Sanh et al., 2019).
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student and teacher hidden states must have the same shape after projection, got "
            f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}."
        )
    s, t = student_hidden.float(), teacher_hidden.float()
    if loss_type == "mse":
        per_position = (s - t).pow(2).mean(-1)
    elif loss_type == "cosine":
        per_position = 1.0 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise ValueError(f"hidden_loss_type={loss_type!r} is not supported; allowed: {list(HIDDEN_LOSS_TYPES)}.")
    return _reduce(per_position, mask, reduction)
