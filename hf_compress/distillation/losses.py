"""Distillation losses as pure functions of logits (and hidden states).

Every function takes student and teacher tensors whose last dimension is the distribution (classes or vocabulary),
an optional boolean `mask` over the leading dimensions (True = this position counts), and a `reduction`:
`"none"` (one value per position), `"sum"` over the kept positions, or `"mean"` over the kept positions.
The trainer uses `"sum"` and divides by the number of items in the whole (accumulated) batch itself.

`fused_linear_distillation_loss` takes the final hidden states and output-head weights instead of logits and
returns the same sums (plus the cross-entropy part) without ever building the full logits.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from transformers.utils import logging

logger = logging.get_logger(__name__)

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


# ---------------------------------------------------------------------------------------------------------------
# Fused LM head + distillation loss: the logits of both models are built and consumed one chunk of positions at a
# time, so the full (positions x vocabulary) logits never exist.


def _postprocess_logits(raw: torch.Tensor, scale: float, softcap: float | None) -> tuple[torch.Tensor, Any]:
    """`softcap * tanh(scale * raw / softcap)` (or `scale * raw`) in fp32, and d(logits)/d(raw) (None when 1)."""
    logits = raw.float()
    if scale != 1.0:
        logits = logits * scale
    if softcap is None:
        return logits, None if scale == 1.0 else scale
    tanh = torch.tanh(logits / softcap)
    return tanh * softcap, (1.0 - tanh * tanh) * scale


def _chunk_losses(
    s_raw: torch.Tensor,
    t_raw: torch.Tensor,
    distill_weight: torch.Tensor,
    targets: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    loss_type: str,
    temperature: float,
    beta: float,
    alpha: float,
    s_scale: float,
    s_softcap: float | None,
    t_scale: float,
    t_softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row distillation and cross-entropy values of one chunk, and d(alpha * distill + (1-alpha) * CE)/d(raw).

    `s_raw`/`t_raw` are the head outputs (before scaling/softcapping) of one chunk of rows; `distill_weight` is the
    per-row weight of the distillation part (0 = left out), `ce_weight` that of the cross-entropy part. Everything
    is computed in fp32; the gradient is returned in `s_raw`'s dtype, ready for the head's matmuls. Written by hand
    because no library computes these gradients in closed form for all four divergences (see each formula below);
    on CUDA this function is compiled with `torch.compile` so the element-wise work fuses into a few kernels.
    """
    s, s_deriv = _postprocess_logits(s_raw, s_scale, s_softcap)
    t, _ = _postprocess_logits(t_raw, t_scale, t_softcap)
    width = s.shape[-1]
    if loss_type == "mse":
        diff = s - t
        rows = diff.pow(2).mean(-1)
        grad = diff * (2.0 / width)
    else:
        inv_t = 1.0 / temperature
        log_ps = torch.log_softmax(s * inv_t, dim=-1)
        log_pt = torch.log_softmax(t * inv_t, dim=-1)
        if loss_type == "jsd" and beta == 0.0:
            loss_type, t2 = "forward_kl", 1.0  # jsd_loss's end point: forward KL without the T² factor
        elif loss_type == "jsd" and beta == 1.0:
            loss_type, t2 = "reverse_kl", 1.0
        else:
            t2 = temperature * temperature
        if loss_type == "forward_kl":
            # KL(pt || ps) * T²; d/ds = T * (ps - pt)   [d/dz with z = s / T is ps - pt]
            pt = log_pt.exp()
            rows = (pt * (log_pt - log_ps)).sum(-1) * t2
            grad = (log_ps.exp() - pt) * (t2 * inv_t)
        elif loss_type == "reverse_kl":
            # KL(ps || pt); d/dz = ps * (log ps - log pt - KL)
            ps = log_ps.exp()
            diff = log_ps - log_pt
            rows = (ps * diff).sum(-1)
            grad = ps * (diff - rows.unsqueeze(-1)) * inv_t
        else:
            # beta * KL(pt || m) + (1 - beta) * KL(ps || m), m = beta * pt + (1 - beta) * ps;
            # d/dz = (1 - beta) * ps * (log ps - log m - KL(ps || m))   [the pt and ps terms through m cancel]
            log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
            ps = log_ps.exp()
            kl_t = (log_pt.exp() * (log_pt - log_m)).sum(-1)
            diff_s = log_ps - log_m
            kl_s = (ps * diff_s).sum(-1)
            rows = beta * kl_t + (1.0 - beta) * kl_s
            grad = ps * (diff_s - kl_s.unsqueeze(-1)) * ((1.0 - beta) * inv_t)
    # Masked rows are zeroed with where (not a multiplication), so a non-finite value there cannot leak in.
    keep = distill_weight > 0
    rows = torch.where(keep, rows, 0.0)
    grad = torch.where(keep.unsqueeze(-1), grad * (alpha * distill_weight).unsqueeze(-1), 0.0)
    if targets is not None and ce_weight is not None:
        # Cross-entropy on the (post-processed) logits at temperature 1; d/ds = softmax(s) - onehot(y).
        log_p = torch.log_softmax(s, dim=-1)
        safe = targets.clamp_min(0).unsqueeze(-1)
        valid = ce_weight > 0
        ce_rows = torch.where(valid, -log_p.gather(-1, safe).squeeze(-1), 0.0)
        p = log_p.exp()
        # The one-hot as a comparison with the column index (element-wise, so it fuses when compiled).
        is_target = torch.arange(width, device=p.device).unsqueeze(0) == safe
        ce_grad = torch.where(is_target, p - 1.0, p) * ((1.0 - alpha) * ce_weight).unsqueeze(-1)
        grad = grad + torch.where(valid.unsqueeze(-1), ce_grad, 0.0)
    else:
        ce_rows = torch.zeros_like(rows)
    if s_deriv is not None:
        grad = grad * s_deriv
    return rows, ce_rows, grad.to(s_raw.dtype)


_COMPILED_CHUNK_LOSSES: Any = None


def _chunk_losses_for(device: torch.device):
    """`_chunk_losses`, compiled with `torch.compile` on CUDA when triton is there (once per process), else eager.

    `HF_COMPRESS_FUSED_LOSS_COMPILE=0` keeps it eager (same values; more memory traffic).
    """
    global _COMPILED_CHUNK_LOSSES
    if device.type != "cuda" or os.environ.get("HF_COMPRESS_FUSED_LOSS_COMPILE", "1") == "0":
        return _chunk_losses
    if _COMPILED_CHUNK_LOSSES is None:
        try:
            import triton  # noqa: F401

            _COMPILED_CHUNK_LOSSES = torch.compile(_chunk_losses, dynamic=True)
        except Exception:  # noqa: BLE001 - no triton: the eager function gives the same values, only slower
            _COMPILED_CHUNK_LOSSES = _chunk_losses
    return _COMPILED_CHUNK_LOSSES


def _run_chunk_losses(chunk_fn, *args):
    """Call the (compiled) chunk function; if compiling fails, warn once and continue eagerly."""
    global _COMPILED_CHUNK_LOSSES
    if chunk_fn is _chunk_losses:
        return _chunk_losses(*args)
    try:
        return chunk_fn(*args)
    except Exception as err:  # noqa: BLE001 - a compiler problem must not stop training
        logger.warning(
            "torch.compile of the fused distillation loss failed (%s: %s); running it eagerly.",
            type(err).__name__,
            str(err).splitlines()[0] if str(err) else "",
        )
        _COMPILED_CHUNK_LOSSES = _chunk_losses
        return _chunk_losses(*args)


_FP32_OUT_GEMM: bool | None = None  # does this torch/device support addmm(out_dtype=float32)? (learned once)


def _accumulate_weight_grad(grad_w: torch.Tensor, grad: torch.Tensor, hidden: torch.Tensor) -> None:
    """`grad_w += grad.T @ hidden`, in `grad_w`'s dtype.

    Same dtypes: one in-place GEMM. fp32 master weights with bf16/fp16 operands (autocast): on CUDA a GEMM with
    bf16 inputs and an fp32 accumulator/output (`addmm(out_dtype=torch.float32)`) when torch supports it, else a
    bf16 product added in fp32 (one transient of the weight's size).
    """
    global _FP32_OUT_GEMM
    if grad_w.dtype == grad.dtype:
        grad_w.addmm_(grad.t(), hidden)
        return
    if grad_w.dtype == torch.float32 and grad.is_cuda and _FP32_OUT_GEMM is not False:
        try:
            torch.addmm(grad_w, grad.t(), hidden, out_dtype=torch.float32, out=grad_w)
            _FP32_OUT_GEMM = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUT_GEMM = False
    grad_w += (grad.t() @ hidden).to(grad_w.dtype)


class _FusedLinearDistillation(torch.autograd.Function):
    """Head matmuls + distillation/CE loss over chunks of rows, with the gradient computed in forward.

    Only one chunk of logits (chunk x vocabulary) exists at a time. The gradients for the student's hidden states,
    head weight and bias are accumulated chunk by chunk during the forward (the closed forms are in `_chunk_losses`)
    and handed out, scaled by the incoming gradient, in backward. Liger-Kernel and TRL ship comparable functions;
    this one adds the cross-entropy part, reverse KL, MSE, temperature x T² and per-row weights of this library's
    losses, so it equals them exactly.
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, targets, distill_weight, ce_weight, opts):
        (
            loss_type,
            temperature,
            beta,
            alpha,
            width,
            s_scale,
            s_softcap,
            t_scale,
            t_softcap,
            s_dtype,
            t_dtype,
            rows,
        ) = opts
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        chunk_fn = _chunk_losses_for(s_hidden.device)
        n = s_hidden.shape[0]
        device_type = s_hidden.device.type
        no_autocast = (
            torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else None
        )
        with no_autocast or contextlib.nullcontext():
            # One cast of each head for the whole call (autocast would cast it per matmul).
            sw = s_weight[:width].to(s_dtype)
            tw = t_weight[:width].to(t_dtype)
            sb = s_bias[:width].to(s_dtype) if s_bias is not None else None
            tb = t_bias[:width].to(t_dtype) if t_bias is not None else None
            grad_h = torch.empty_like(s_hidden) if need_h else None
            grad_w = torch.zeros_like(s_weight) if need_w else None
            grad_b = torch.zeros_like(s_bias) if need_b else None
            distill_sum = s_hidden.new_zeros((), dtype=torch.float32)
            ce_sum = s_hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, n, rows):
                end = min(n, start + rows)
                hs = s_hidden[start:end].to(s_dtype)
                s_raw = F.linear(hs, sw, sb)
                t_raw = F.linear(t_hidden[start:end].to(t_dtype), tw, tb)
                d_rows, ce_rows, grad = _run_chunk_losses(
                    chunk_fn,
                    s_raw,
                    t_raw,
                    distill_weight[start:end],
                    targets[start:end] if targets is not None else None,
                    ce_weight[start:end] if ce_weight is not None else None,
                    loss_type,
                    temperature,
                    beta,
                    alpha,
                    s_scale,
                    s_softcap,
                    t_scale,
                    t_softcap,
                )
                del s_raw, t_raw
                distill_sum += d_rows.sum()
                ce_sum += ce_rows.sum()
                if need_h:
                    grad_h[start:end] = grad @ sw
                if need_w:
                    _accumulate_weight_grad(grad_w[:width], grad, hs)
                if need_b:
                    grad_b[:width] += grad.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        total = alpha * distill_sum + (1.0 - alpha) * ce_sum
        ctx.mark_non_differentiable(distill_sum, ce_sum)
        return total, distill_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_total, _grad_distill, _grad_ce):
        # Scaled in place: these buffers are as large as the head weight, and a copy would double that. A second
        # backward through the same graph (retain_graph=True) is refused by autograd's saved-tensor version check.
        grads = [g.mul_(grad_total) if g is not None else None for g in ctx.saved_tensors]
        return (grads[0], grads[1], grads[2], None, None, None, None, None, None, None)


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `nn.Linear` would compute in here: the autocast dtype if autocast is on, else the inputs' dtype."""
    device_type = hidden.device.type
    if not torch.amp.is_autocast_available(device_type):
        return torch.promote_types(hidden.dtype, weight.dtype)
    if torch.is_autocast_enabled(device_type) and hidden.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    loss_type: str = "forward_kl",
    temperature: float = 2.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_logit_softcap: float | None = None,
    teacher_logit_softcap: float | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    Distillation (+ cross-entropy) loss from the final hidden states and output heads, without the full logits.

    Equal in value and gradient to building `logits = softcap(scale * (hidden @ weight.T + bias))[..., :vocab_size]`
    for both models and computing `alpha * distillation_loss(student_logits, teacher_logits, loss_type, temperature,
    beta, mask, reduction="sum") + (1 - alpha) * cross_entropy(student_logits, labels, reduction="sum")`, but only
    `chunk_size` positions' logits exist at any time. Softmax and temperature run in fp32 whatever the inputs' dtype;
    the matmuls run in the dtype `nn.Linear` would use (the autocast dtype under autocast).

    Args:
        student_hidden (`torch.Tensor`): student's final hidden states (the head's input), shape `(..., H_s)`.
        student_weight (`torch.Tensor`): student head weight `(V_s, H_s)`; gets a gradient if it requires one.
        teacher_hidden (`torch.Tensor`): teacher's final hidden states, shape `(..., H_t)` with the same leading
            dimensions.
        teacher_weight (`torch.Tensor`): teacher head weight `(V_t, H_t)` (no gradient).
        labels (`torch.Tensor`, *optional*): target ids over the leading dimensions (-100 = none); needed when
            `alpha < 1`.
        loss_type (`str`, *optional*, defaults to `"forward_kl"`): `forward_kl`, `reverse_kl`, `jsd` or `mse`.
        temperature (`float`, *optional*, defaults to `2.0`), alpha (`float`, *optional*, defaults to `0.5`),
        beta (`float`, *optional*, defaults to `0.5`): as in [`distillation_loss`] and `DistillationConfig`.
        mask (`torch.Tensor`, *optional*): boolean over the leading dimensions, True = the position counts (both parts).
        student_bias, teacher_bias (`torch.Tensor`, *optional*): head biases.
        vocab_size (`int`, *optional*): compare only the first `vocab_size` logits (padded vocabularies); defaults to
            the smaller of the two heads' rows, which must then be equal.
        student_logit_scale, teacher_logit_scale (`float`, *optional*, defaults to `1.0`): multipliers of the logits.
        student_logit_softcap, teacher_logit_softcap (`float`, *optional*): Gemma-style final logit soft-capping.
        chunk_size (`int`, *optional*): positions per chunk; by default about 2^27 logits per chunk on CUDA and
            2^22 on CPU. Each chunk also reads and writes the whole head-weight gradient once, so fewer, larger
            chunks are faster; smaller ones use less memory.

    Returns:
        `(total, distill_sum, task_sum)`: only `total` carries a gradient; the sums are over the kept positions.

    >>> import torch
    >>> from hf_compress import fused_linear_distillation_loss
    >>> h_s, h_t = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 16)
    >>> w_s, w_t = torch.randn(32, 8, requires_grad=True), torch.randn(32, 16)
    >>> total, kl, ce = fused_linear_distillation_loss(h_s, w_s, h_t, w_t, torch.randint(0, 32, (2, 5)))
    >>> total.backward()
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported; allowed: {list(LOSS_TYPES)}.")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1].")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1].")
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} must "
            "have the same leading (position) dimensions."
        )
    for name, hidden, weight in (
        ("student", student_hidden, student_weight),
        ("teacher", teacher_hidden, teacher_weight),
    ):
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"{name}_weight must have shape (vocabulary, {hidden.shape[-1]}) to match {name}_hidden, got "
                f"{tuple(weight.shape)}."
            )
    if vocab_size is None:
        if student_weight.shape[0] != teacher_weight.shape[0]:
            raise ValueError(
                f"the heads have {student_weight.shape[0]} and {teacher_weight.shape[0]} rows; pass vocab_size (the "
                "shared range) when one vocabulary is padded."
            )
        vocab_size = student_weight.shape[0]
    if not 0 < vocab_size <= min(student_weight.shape[0], teacher_weight.shape[0]):
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {min(student_weight.shape[0], teacher_weight.shape[0])}]."
        )
    if alpha < 1.0 and labels is None:
        raise ValueError("labels are needed when alpha < 1 (the cross-entropy part).")
    for name, tensor in (("labels", labels), ("mask", mask)):
        if tensor is not None and tensor.shape != lead:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but the positions have {tuple(lead)}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int.")
    if chunk_size is None:
        target = 1 << 27 if student_hidden.device.type == "cuda" else 1 << 22
        chunk_size = max(1, target // vocab_size)

    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(s_hidden.device)
    rows = s_hidden.shape[0]
    keep = mask.reshape(-1).to(s_hidden.device, torch.bool) if mask is not None else None
    distill_weight = keep.float() if keep is not None else s_hidden.new_ones(rows, dtype=torch.float32)
    targets = ce_weight = None
    if alpha < 1.0:
        targets = labels.reshape(-1).to(s_hidden.device)
        valid = targets != -100
        if keep is not None:
            valid = valid & keep
        ce_weight = valid.float()
    opts = (
        loss_type,
        float(temperature),
        float(beta),
        float(alpha),
        int(vocab_size),
        float(student_logit_scale),
        None if student_logit_softcap is None else float(student_logit_softcap),
        float(teacher_logit_scale),
        None if teacher_logit_softcap is None else float(teacher_logit_softcap),
        _matmul_dtype(s_hidden, student_weight),
        _matmul_dtype(t_hidden, teacher_weight),
        int(chunk_size),
    )
    return _FusedLinearDistillation.apply(
        s_hidden,
        student_weight,
        student_bias,
        t_hidden,
        teacher_weight.to(s_hidden.device),
        teacher_bias.to(s_hidden.device) if teacher_bias is not None else None,
        targets,
        distill_weight,
        ce_weight,
        opts,
    )
