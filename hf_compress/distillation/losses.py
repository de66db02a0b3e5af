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


class _FusedForwardKLAndCrossEntropy(torch.autograd.Function):
    """alpha * forward-KL(T) + (1 - alpha) * cross-entropy, summed over rows, with the gradient computed in forward.

    Written by hand (no library fuses these two): the gradient with respect to the student logits is known in closed
    form, T * (softmax(s / T) - softmax(t / T)) for the KL times T² and softmax(s) - onehot(y) for the
    cross-entropy, so each chunk of rows is processed once while it sits in cache, and autograd keeps one buffer of
    the logits' size instead of every intermediate. This keeps the distillation loss a small cost next to the two
    forward passes (see benchmarks/bench_distillation.py).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, row_mask, temperature, alpha, chunk_elements):
        width = student_logits.shape[-1]
        s_all = student_logits.reshape(-1, width)
        t_all = teacher_logits.reshape(-1, width)
        rows = s_all.shape[0]
        keep = row_mask.reshape(-1) if row_mask is not None else None
        y_all = labels.reshape(-1) if labels is not None else None
        grad = torch.empty((rows, width), dtype=torch.float32, device=s_all.device)
        kl_sum = s_all.new_zeros((), dtype=torch.float32)
        ce_sum = s_all.new_zeros((), dtype=torch.float32)
        step = max(1, chunk_elements // max(width, 1))
        for start in range(0, rows, step):
            end = min(rows, start + step)
            s = s_all[start:end].float()
            t = t_all[start:end].float()
            log_ps = torch.log_softmax(s / temperature, dim=-1)
            log_pt = torch.log_softmax(t / temperature, dim=-1)
            pt = log_pt.exp()
            kl_rows = (pt * (log_pt - log_ps)).sum(-1) * temperature**2
            g = log_ps.exp_().sub_(pt).mul_(alpha * temperature)  # d(alpha * KL * T²)/ds
            weight = keep[start:end].to(torch.float32) if keep is not None else None
            if weight is not None:
                kl_rows = kl_rows * weight
            kl_sum += kl_rows.sum()
            if alpha < 1.0:
                y = y_all[start:end]
                valid = y != -100
                if weight is not None:
                    valid = valid & keep[start:end]
                log_p1 = torch.log_softmax(s, dim=-1)
                safe_y = y.clamp_min(0).unsqueeze(-1)
                ce_rows = -log_p1.gather(-1, safe_y).squeeze(-1) * valid
                ce_sum += ce_rows.sum()
                p1 = log_p1.exp_()
                p1.scatter_add_(-1, safe_y, torch.full_like(safe_y, -1.0, dtype=p1.dtype))
                g.add_(p1.mul_((1.0 - alpha) * valid.unsqueeze(-1)))
            if weight is not None:
                g.mul_(weight.unsqueeze(-1))
            grad[start:end] = g
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = student_logits.shape, student_logits.dtype
        total = alpha * kl_sum + (1.0 - alpha) * ce_sum
        ctx.mark_non_differentiable(kl_sum, ce_sum)
        return total, kl_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_total, _grad_kl, _grad_ce):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total).to(ctx.dtype).view(ctx.shape), None, None, None, None, None, None


def fused_forward_kl_and_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    mask: torch.Tensor | None = None,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(alpha * sum KL*T² + (1 - alpha) * sum CE, sum KL*T², sum CE)` over the kept positions, in one fused pass.

    Equal in value and gradient to `alpha * forward_kl_loss(..., reduction="sum") + (1 - alpha) * cross_entropy(
    ..., reduction="sum")`; only the first element carries a gradient. Labels equal to -100 are left out of the
    cross-entropy; `mask` leaves positions out of both parts.
    """
    _check_shapes(student_logits, teacher_logits)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    if alpha < 1.0 and labels is None:
        raise ValueError("labels are needed when alpha < 1 (the cross-entropy part).")
    if chunk_elements is None:
        # CPU: chunks that stay in cache; GPU: few, large chunks (each chunk costs kernel launches).
        chunk_elements = 1 << 18 if student_logits.device.type == "cpu" else 1 << 26
    return _FusedForwardKLAndCrossEntropy.apply(
        student_logits, teacher_logits, labels, mask, float(temperature), float(alpha), int(chunk_elements)
    )
