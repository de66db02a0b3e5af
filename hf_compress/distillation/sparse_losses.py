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
    rest bin). With z = s / T, q = softmax(z), teacher bins p on the stored ids K and rest mass r, the target is
    u_i = p_i on K and u_i = c q_i off K, with c = r / (1 - sum_K q) (the rest mass spread as the student's own
    tail), and d(KL * T²)/ds = T (q - u). The gradient is therefore one dense pass, q times a per-row factor, written
    straight into the gradient buffer, plus sparse corrections at the k ids and at the label: a few passes over the
    logits per chunk of rows, so training from a cache costs little more than cross-entropy.
    """

    @staticmethod
    def forward(ctx, student_logits, ids, probs, rest, neg_entropy, labels, keep, temperature, alpha, chunk_elements):
        rows, width = student_logits.shape
        grad = torch.empty((rows, width), dtype=torch.float32, device=student_logits.device)
        kl_sum = student_logits.new_zeros((), dtype=torch.float32)
        ce_sum = student_logits.new_zeros((), dtype=torch.float32)
        step = max(1, chunk_elements // max(width, 1))
        unit_temperature = temperature == 1.0
        tiny = torch.finfo(torch.float32).tiny
        for start in range(0, rows, step):
            end = min(rows, start + step)
            s = student_logits[start:end]
            if unit_temperature:  # one fused kernel reads the (bf16) logits and writes fp32 log-probabilities
                log_q = torch.log_softmax(s, -1, dtype=torch.float32)
            else:
                log_q = torch.log_softmax(s.to(torch.float32, copy=True).div_(temperature), -1)
            idx = ids[start:end]
            p, r = _normalised(probs[start:end], rest[start:end] if rest is not None else None)
            w = keep[start:end].to(torch.float32) if keep is not None else log_q.new_ones(end - start)
            log_q_k = log_q.gather(-1, idx)
            q_k = log_q_k.exp()
            cross = -(p * log_q_k).sum(-1)
            if alpha < 1.0:
                y = labels[start:end]
                valid = (y != -100) & (w > 0)
                safe_y = y.clamp_min(0).unsqueeze(-1)
                b = (1.0 - alpha) * valid.to(torch.float32)  # per-row weight of the cross-entropy gradient
                log_p1 = log_q if unit_temperature else torch.log_softmax(s, -1, dtype=torch.float32)
                ce_sum += -(log_p1.gather(-1, safe_y).squeeze(-1) * valid).sum()
                if not unit_temperature:
                    p1_k = log_p1.gather(-1, idx).exp()
            out = grad[start:end]
            torch.exp(log_q, out=out)  # q, written straight into the gradient buffer
            del log_q
            c = None
            if r is not None:
                # The student's mass off the stored ids, summed over those tokens (log(1 - sum q_k) would cancel
                # catastrophically for a confident student). The stored ids' entries are rewritten below.
                out.scatter_(-1, idx, 0.0)
                tail = out.sum(-1).clamp_min(tiny)
                cross = cross - r * tail.log()
                c = r / tail
            if neg_entropy is not None:
                const = neg_entropy[start:end].float()
            else:
                const = torch.xlogy(p, p).sum(-1) + (torch.xlogy(r, r) if r is not None else 0.0)
            kl_sum += torch.where(w > 0, (const + cross) * temperature**2, 0.0).sum()

            a = (alpha * temperature) * w  # per-row weight of the KL gradient
            factor = a * (1.0 - c) if c is not None else a
            if alpha < 1.0 and unit_temperature:
                factor = factor + b
            out.mul_(factor.unsqueeze(-1))  # off the stored ids: a (1 - c) q (+ b q)
            if alpha < 1.0 and not unit_temperature:
                out.add_(log_p1.exp_().mul_(b.unsqueeze(-1)))  # + b softmax(s)
            if alpha < 1.0:
                del log_p1
            # At the stored ids the KL gradient is a (q - p), not a (1 - c) q.
            if c is not None:
                # topk: ids unique per row, so the value is written (c can be huge, a correction would cancel).
                k_value = a.unsqueeze(-1) * (q_k - p)
                if alpha < 1.0:
                    k_value += b.unsqueeze(-1) * (q_k if unit_temperature else p1_k)
                out.scatter_(-1, idx, k_value)
            else:
                # sampled (c = 0): add -a p; padding entries (p = 0, repeated ids) add nothing.
                out.scatter_add_(-1, idx, p.mul(a.unsqueeze(-1)).neg_())
            if alpha < 1.0:
                out.scatter_add_(-1, safe_y, -b.unsqueeze(-1))
        ctx.save_for_backward(grad)
        ctx.dtype = student_logits.dtype
        ctx.used = False
        total = alpha * kl_sum + (1.0 - alpha) * ce_sum
        ctx.mark_non_differentiable(kl_sum, ce_sum)
        return total, kl_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_total, _grad_kl, _grad_ce):
        if ctx.used:  # the buffer is scaled in place (no second logits-sized copy)
            raise RuntimeError("backward through sparse_forward_kl_and_cross_entropy can run only once.")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_total).to(ctx.dtype), *([None] * 9)


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
        # Few, large chunks: each chunk costs a few dozen kernel launches (GPU) or threaded ops (CPU, where small
        # ops pay the thread wake-up each time: 2**18-element chunks measured 4.5x slower than 2**22 on 2 cores).
        chunk_elements = 1 << 22 if s.device.type == "cpu" else 1 << 26
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
