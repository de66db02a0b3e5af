"""Distillation losses against sparse teacher targets, as cached by `cache_teacher_logits` (pure functions).

A sparse target holds, per position, `k` token ids with their teacher probabilities (at the training temperature)
and, for `topk` targets, the teacher's remaining mass `rest_mass` on every other token. The losses compare the
student's full distribution with it on the (k + 1) bins {id_1, ..., id_k, "every other token"}:

- `topk` targets: each divergence (forward KL, reverse KL, JSD) is computed between the (k + 1)-bin coarsening of the
  teacher and of the student. This is exact when k is the vocabulary size (no rest bin) and, for forward KL, its
  gradient pulls the student's tail towards the teacher's rest mass, spread as the student's own tail distribution.
- `sampled` targets (Anshumann et al., ACL 2025, "Sparse Logit Sampling"): the probabilities are counts / k of k
  draws with replacement from the teacher's distribution, with no rest bin. Forward KL is linear in the target, so
  its gradient is an unbiased estimate of the full forward-KL gradient; reverse KL and JSD are not defined on such
  targets. `neg_entropy` (the teacher's sum p log p, stored at caching time) makes the loss value an unbiased
  estimate of the full KL as well.

Shapes: `student_logits` (..., V); `target_ids` and `target_probs` (..., K); `rest_mass` and `neg_entropy` (...);
`mask` (...) with True = this position counts. Entries with probability 0 are padding (their id is ignored).
"""

from __future__ import annotations

import math

import torch

from .losses import _reduce

SPARSE_LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd")
# Teacher bins stored as 0 (fp16 underflow) are read as this probability by reverse KL, which takes their logarithm.
_MIN_TEACHER_PROBABILITY = 1e-8


def _flatten(student_logits, target_ids, target_probs, rest_mass, neg_entropy, mask):
    width = student_logits.shape[-1]
    rows = student_logits.shape[:-1].numel()
    if target_ids.shape != target_probs.shape:
        raise ValueError(
            f"target_ids {tuple(target_ids.shape)} and target_probs {tuple(target_probs.shape)} must have one shape."
        )
    if target_ids.shape[:-1].numel() != rows:
        raise ValueError(
            f"the sparse targets hold {target_ids.shape[:-1].numel()} positions ({tuple(target_ids.shape)}) but the "
            f"student logits have {rows} ({tuple(student_logits.shape)})."
        )
    s = student_logits.reshape(rows, width)
    ids = target_ids.reshape(rows, -1).long()
    probs = target_probs.reshape(rows, -1)
    rest = rest_mass.reshape(rows) if rest_mass is not None else None
    negent = neg_entropy.reshape(rows) if neg_entropy is not None else None
    keep = mask.reshape(rows).to(torch.bool) if mask is not None else None
    return s, ids, probs, rest, negent, keep


def _normalised(probs: torch.Tensor, rest: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher bins scaled to sum to 1 (fp16 storage rounds them); padded positions (all zero) stay zero."""
    probs = probs.float()
    total = probs.sum(-1)
    if rest is not None:
        rest = rest.float()
        total = total + rest
    total = total.clamp_min(1e-12)
    return probs / total.unsqueeze(-1), (rest / total if rest is not None else None)


class _SparseForwardKLAndCrossEntropy(torch.autograd.Function):
    """alpha * forward-KL(T) on sparse targets + (1 - alpha) * cross-entropy, summed over rows, gradient in forward.

    Written by hand like `_FusedForwardKLAndCrossEntropy` (no library computes a KL against sparse targets with a
    rest bin): with z = s / T, q = softmax(z) and the target distribution u (the teacher's bins, the rest mass spread
    over the student's tail as q_i / (1 - Q)), d(KL * T²)/ds = T * (q - u), so each chunk of rows is processed once.
    """

    @staticmethod
    def forward(ctx, student_logits, ids, probs, rest, neg_entropy, labels, keep, temperature, alpha, chunk_elements):
        rows, width = student_logits.shape
        grad = torch.empty((rows, width), dtype=torch.float32, device=student_logits.device)
        kl_sum = student_logits.new_zeros((), dtype=torch.float32)
        ce_sum = student_logits.new_zeros((), dtype=torch.float32)
        step = max(1, chunk_elements // max(width, 1))
        for start in range(0, rows, step):
            end = min(rows, start + step)
            s = student_logits[start:end].float()
            z = s / temperature if temperature != 1.0 else s
            lse = torch.logsumexp(z, -1, keepdim=True)
            log_q = z - lse
            idx = ids[start:end]
            p, r = _normalised(probs[start:end], rest[start:end] if rest is not None else None)
            cross = -(p * log_q.gather(-1, idx)).sum(-1)
            target = torch.zeros_like(z).scatter_add_(-1, idx, p)
            if r is not None:
                # The tail: every token but the k stored ones. Its log-mass is computed from the logits themselves
                # (not as log(1 - sum q_k), which cancels catastrophically when the student is confident).
                z_tail = z.scatter(-1, idx, float("-inf"))
                lse_tail = torch.logsumexp(z_tail, -1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
                cross = cross - r * (lse_tail - lse).squeeze(-1)
                target.add_(z_tail.sub_(lse_tail).exp_().mul_(r.unsqueeze(-1)))
                del z_tail
            if neg_entropy is not None:
                const = neg_entropy[start:end].float()
            else:
                const = torch.xlogy(p, p).sum(-1) + (torch.xlogy(r, r) if r is not None else 0.0)
            kl_rows = (const + cross) * temperature**2
            g = log_q.exp().sub_(target).mul_(alpha * temperature)  # d(alpha * KL * T²)/ds
            del target
            weight = keep[start:end].to(torch.float32) if keep is not None else None
            if weight is not None:
                kl_rows = kl_rows * weight
            kl_sum += kl_rows.sum()
            if alpha < 1.0:
                y = labels[start:end]
                valid = y != -100
                if keep is not None:
                    valid = valid & keep[start:end]
                log_p1 = log_q if temperature == 1.0 else torch.log_softmax(s, dim=-1)
                safe_y = y.clamp_min(0).unsqueeze(-1)
                ce_sum += (-log_p1.gather(-1, safe_y).squeeze(-1) * valid).sum()
                p1 = log_p1.exp()
                p1.scatter_add_(-1, safe_y, torch.full_like(safe_y, -1.0, dtype=p1.dtype))
                g.add_(p1.mul_((1.0 - alpha) * valid.unsqueeze(-1)))
            if weight is not None:
                g.mul_(weight.unsqueeze(-1))
            grad[start:end] = g
        ctx.save_for_backward(grad)
        ctx.dtype = student_logits.dtype
        total = alpha * kl_sum + (1.0 - alpha) * ce_sum
        ctx.mark_non_differentiable(kl_sum, ce_sum)
        return total, kl_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_total, _grad_kl, _grad_ce):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total).to(ctx.dtype), *([None] * 9)


def sparse_forward_kl_and_cross_entropy(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    rest_mass: torch.Tensor | None = None,
    neg_entropy: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    mask: torch.Tensor | None = None,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(alpha * sum KL*T² + (1 - alpha) * sum CE, sum KL*T², sum CE)` against sparse targets, in one fused pass.

    KL is the forward KL(teacher || student) on the (k + 1) bins (k bins without `rest_mass`), times T²; `labels`
    (-100 = none) feed the cross-entropy, which is computed at temperature 1. Only the first element carries a
    gradient. With `neg_entropy` given (sampled targets), the teacher's entropy term of the KL is taken from it.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    if alpha < 1.0 and labels is None:
        raise ValueError("labels are needed when alpha < 1 (the cross-entropy part).")
    s, ids, probs, rest, negent, keep = _flatten(
        student_logits, target_ids, target_probs, rest_mass, neg_entropy, mask
    )
    y = labels.reshape(-1) if labels is not None else None
    if chunk_elements is None:
        chunk_elements = 1 << 18 if s.device.type == "cpu" else 1 << 26
    total, kl_sum, ce_sum = _SparseForwardKLAndCrossEntropy.apply(
        s, ids, probs, rest, negent, y, keep, float(temperature), float(alpha), int(chunk_elements)
    )
    return total, kl_sum, ce_sum


def sparse_distillation_loss(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    rest_mass: torch.Tensor | None = None,
    loss_type: str = "forward_kl",
    temperature: float = 2.0,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL (times T²), reverse KL or generalized JSD between the (k + 1)-bin coarsenings of teacher and student.

    The semantics follow the dense losses of `hf_compress.distillation.losses` (`jsd` with `beta=0` is forward KL
    without T², `beta=1` reverse KL); with k equal to the vocabulary size (no `rest_mass`) they are the dense losses.
    Computed with autograd on the full student log-softmax; `sparse_forward_kl_and_cross_entropy` is the fast path
    for forward KL. Teacher bins stored as 0 are read as 1e-8 by reverse KL (whose value would otherwise be infinite).
    """
    if loss_type not in SPARSE_LOSS_TYPES:
        raise ValueError(
            f"loss_type={loss_type!r} is not defined on sparse teacher targets; allowed: {list(SPARSE_LOSS_TYPES)}."
        )
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1].")
    s, ids, probs, rest, _, keep = _flatten(student_logits, target_ids, target_probs, rest_mass, None, mask)
    z = s.float() / temperature
    lse = torch.logsumexp(z, -1, keepdim=True)
    log_q = z.gather(-1, ids) - lse
    p, r = _normalised(probs, rest)
    if r is not None:
        lse_tail = torch.logsumexp(z.scatter(-1, ids, float("-inf")), -1, keepdim=True)
        log_q = torch.cat([log_q, lse_tail - lse], -1)
        p = torch.cat([p, r.unsqueeze(-1)], -1)
    q = log_q.exp()
    forward = (torch.xlogy(p, p) - p * log_q).sum(-1)
    reverse = (q * (log_q - p.clamp_min(_MIN_TEACHER_PROBABILITY).log())).sum(-1)
    if loss_type == "forward_kl":
        per_position = forward * temperature**2
    elif loss_type == "reverse_kl" or beta == 1.0:
        per_position = reverse
    elif beta == 0.0:
        per_position = forward
    else:
        log_m = torch.logsumexp(torch.stack([p.log() + math.log(beta), log_q + math.log1p(-beta)]), 0)
        kl_t = (torch.xlogy(p, p) - p * log_m).sum(-1)
        kl_s = (q * (log_q - log_m)).sum(-1)
        per_position = beta * kl_t + (1.0 - beta) * kl_s
    leading = student_logits.shape[:-1]
    return _reduce(per_position.reshape(leading), keep.reshape(leading) if keep is not None else None, reduction)
