"""Each distillation loss against an independently written formula (loops over positions, numpy math)."""

import math

import numpy as np
import pytest
import torch

from hf_compress import (
    distillation_loss,
    forward_kl_loss,
    hidden_state_loss,
    jsd_loss,
    mse_logits_loss,
    reverse_kl_loss,
)


def _softmax(x, t):
    z = np.asarray(x, dtype=np.float64) / t
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def _kl(p, q):
    return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0))


def _per_position(s_logits, t_logits, fn):
    s2 = s_logits.reshape(-1, s_logits.shape[-1]).double().numpy()
    t2 = t_logits.reshape(-1, t_logits.shape[-1]).double().numpy()
    return np.array([fn(a, b) for a, b in zip(s2, t2)]).reshape(s_logits.shape[:-1])


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 11, generator=g) * 2
    t = torch.randn(3, 5, 11, generator=g) * 2
    mask = torch.rand(3, 5, generator=g) > 0.3
    return s, t, mask


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
def test_forward_kl_matches_formula_with_temperature_and_mask(logits, temperature):
    s, t, mask = logits
    ref = _per_position(s, t, lambda a, b: _kl(_softmax(b, temperature), _softmax(a, temperature)) * temperature**2)
    got = forward_kl_loss(s, t, temperature, mask=mask, reduction="none")
    np.testing.assert_allclose(got.numpy(), np.where(mask.numpy(), ref, 0.0), rtol=1e-4, atol=1e-6)
    mean = forward_kl_loss(s, t, temperature, mask=mask, reduction="mean")
    assert mean.item() == pytest.approx(ref[mask.numpy()].mean(), rel=1e-4)
    total = forward_kl_loss(s, t, temperature, mask=mask, reduction="sum")
    assert total.item() == pytest.approx(ref[mask.numpy()].sum(), rel=1e-4)


def test_reverse_kl_matches_formula(logits):
    s, t, mask = logits
    ref = _per_position(s, t, lambda a, b: _kl(_softmax(a, 3.0), _softmax(b, 3.0)))
    got = reverse_kl_loss(s, t, 3.0, mask=mask, reduction="mean")
    assert got.item() == pytest.approx(ref[mask.numpy()].mean(), rel=1e-4)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_formula(logits, beta):
    s, t, mask = logits

    def jsd(a, b):
        p_s, p_t = _softmax(a, 2.0), _softmax(b, 2.0)
        m = beta * p_t + (1 - beta) * p_s
        return beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)

    ref = _per_position(s, t, jsd)
    got = jsd_loss(s, t, 2.0, beta=beta, mask=mask, reduction="mean")
    assert got.item() == pytest.approx(ref[mask.numpy()].mean(), rel=1e-4)


def test_jsd_end_points_are_the_two_kl_directions(logits):
    s, t, _ = logits
    assert jsd_loss(s, t, 1.0, beta=0.0).item() == pytest.approx(forward_kl_loss(s, t, 1.0).item(), rel=1e-5)
    assert jsd_loss(s, t, 1.0, beta=1.0).item() == pytest.approx(reverse_kl_loss(s, t, 1.0).item(), rel=1e-5)
    # symmetric JSD is bounded by log 2
    assert 0 < jsd_loss(s, t, 1.0, beta=0.5).item() <= math.log(2)


def test_mse_on_raw_logits(logits):
    s, t, mask = logits
    ref = ((s.double() - t.double()) ** 2).mean(-1).numpy()
    got = mse_logits_loss(s, t, mask=mask, reduction="sum")
    assert got.item() == pytest.approx(ref[mask.numpy()].sum(), rel=1e-5)


def test_identical_distributions_give_zero_and_losses_are_nonnegative(logits):
    s, t, _ = logits
    for loss_type in ("forward_kl", "reverse_kl", "jsd", "mse"):
        assert distillation_loss(s, s.clone(), loss_type).item() == pytest.approx(0.0, abs=1e-6)
        assert distillation_loss(s, t, loss_type).item() > 0


def test_hidden_state_losses(logits):
    s, t, mask = logits
    ref_mse = ((s.double() - t.double()) ** 2).mean(-1).numpy()[mask.numpy()].mean()
    assert hidden_state_loss(s, t, "mse", mask).item() == pytest.approx(ref_mse, rel=1e-5)
    sd, td = s.double().numpy(), t.double().numpy()
    cos = (sd * td).sum(-1) / (np.linalg.norm(sd, axis=-1) * np.linalg.norm(td, axis=-1))
    assert hidden_state_loss(s, t, "cosine", mask).item() == pytest.approx((1 - cos)[mask.numpy()].mean(), rel=1e-5)


def test_bad_arguments_are_named():
    s = torch.randn(2, 4)
    with pytest.raises(ValueError, match="loss_type"):
        distillation_loss(s, s, "kl")
    with pytest.raises(ValueError, match="temperature"):
        forward_kl_loss(s, s, 0.0)
    with pytest.raises(ValueError, match="beta"):
        jsd_loss(s, s, 1.0, beta=1.5)
    with pytest.raises(ValueError, match="same shape"):
        forward_kl_loss(s, torch.randn(2, 5))
    with pytest.raises(ValueError, match="reduction"):
        forward_kl_loss(s, s, reduction="avg")


@pytest.mark.parametrize("alpha, chunk", [(0.3, 40), (1.0, 7), (0.5, 1 << 20)])
def test_fused_forward_kl_and_ce_equals_the_pure_losses_in_value_and_gradient(alpha, chunk):
    import torch.nn.functional as F

    from hf_compress.distillation.losses import fused_forward_kl_and_cross_entropy

    g = torch.Generator().manual_seed(1)
    s0, t = torch.randn(4, 9, 50, generator=g) * 2, torch.randn(4, 9, 50, generator=g) * 2
    labels = torch.randint(0, 50, (4, 9), generator=g)
    labels[0, :3] = -100
    mask = labels != -100
    mask[1, -2:] = False
    s = s0.clone().requires_grad_()
    ce = F.cross_entropy(s.reshape(-1, 50), labels.masked_fill(~mask, -100).reshape(-1), reduction="sum")
    kl = forward_kl_loss(s, t, 2.0, mask=mask, reduction="sum")
    ref = alpha * kl + (1 - alpha) * ce
    ref.backward()
    s_fused = s0.clone().requires_grad_()
    total, kl_sum, ce_sum = fused_forward_kl_and_cross_entropy(
        s_fused, t, labels if alpha < 1 else None, 2.0, alpha, mask, chunk_elements=chunk
    )
    total.backward()
    assert total.item() == pytest.approx(ref.item(), rel=1e-5)
    assert kl_sum.item() == pytest.approx(kl.item(), rel=1e-5)
    if alpha < 1:
        assert ce_sum.item() == pytest.approx(ce.item(), rel=1e-5)
    torch.testing.assert_close(s_fused.grad, s.grad, rtol=1e-5, atol=1e-6)
