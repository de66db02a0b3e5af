"""Row-wise Wanda and SparseGPT against formulas and brute-force reconstructions on tiny layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_compress import PruningConfig, prune_
from hf_compress.pruning.sparsegpt import sparsegpt_prune_weight
from hf_compress.pruning.unstructured import compute_masks


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


class _OneLayer(nn.Module):
    def __init__(self, weight=None):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 8, bias=False)])

    def forward(self, input_ids):
        return self.layers[0](input_ids)


def _calibration(n=4, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 96, (2, length), generator=g)} for _ in range(n)]


# ---------------------------------------------------------------------------------------------------- Wanda


def test_wanda_defaults_to_rows_and_matches_the_formula():
    assert PruningConfig(method="wanda").scope == "row"
    assert PruningConfig(method="magnitude").scope == "layer"
    assert PruningConfig(method="wanda", pattern="2:4").scope == "row"
    torch.manual_seed(0)
    model = _OneLayer()
    weight = model.layers[0].weight.detach().clone()
    x = torch.randn(5, 7, 16) * torch.linspace(0.1, 3, 16)
    masks = prune_(model, PruningConfig(method="wanda", sparsity=0.5), calibration_data=[x])
    # Independent formula: score_ij = |W_ij| * ||X_j||_2, the 8 lowest of each row pruned.
    score = weight.abs() * x.reshape(-1, 16).norm(dim=0)
    expected = score >= score.sort(dim=1).values[:, 8:9]
    assert torch.equal(masks["layers.0"], expected)
    assert torch.equal(masks["layers.0"].sum(dim=1), torch.full((8,), 8))  # every row keeps exactly half


def test_layer_scope_still_available_for_wanda():
    torch.manual_seed(0)
    model = _OneLayer()
    with torch.no_grad():
        model.layers[0].weight[:4] *= 10  # rows of very different scale: per-layer prunes the small rows harder
    x = torch.randn(20, 16)
    masks = prune_(model, PruningConfig(method="wanda", scope="layer"), calibration_data=[x])
    per_row = masks["layers.0"].sum(dim=1)
    assert per_row.sum() == 64 and per_row[:4].min() > per_row[4:].max()


def test_global_scope_is_refused_for_nm_and_sparsegpt():
    with pytest.raises(ValueError, match="scope='global'"):
        PruningConfig(method="wanda", pattern="2:4", scope="global")
    with pytest.raises(ValueError, match="sparsegpt"):
        PruningConfig(method="sparsegpt", scope="global")


# ---------------------------------------------------------------------------------------------------- SparseGPT


def _obs_reference(weight, hessian, keep, percdamp=0.01):
    """Independent OBS: for each row, prune the masked columns left to right; each pruned weight's error moves
    onto the later columns through the explicit inverse of the remaining (dampened) Hessian."""
    H = hessian.double().clone()
    H += percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    W = weight.double().clone()
    for r in range(W.shape[0]):
        w = W[r]
        for i in range(W.shape[1]):
            sub_inv = torch.linalg.inv(H[i:, i:])
            if not keep[r, i]:
                w[i:] -= w[i] / sub_inv[0, 0] * sub_inv[:, 0]
                w[i] = 0.0
    return W


def _error(weight, new, x):
    return float(((x @ (weight - new).t()) ** 2).sum())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_equals_independent_obs_and_beats_magnitude(nm):
    torch.manual_seed(0)
    weight = torch.randn(6, 16)
    x = torch.randn(64, 16) @ torch.randn(16, 16)  # correlated inputs: reconstruction matters
    hessian = x.t() @ x
    new, keep = sparsegpt_prune_weight(weight, hessian, 0.5, nm=nm, blocksize=8)
    assert int(keep.sum()) == 48 and torch.all(new[~keep] == 0)
    if nm is not None:
        assert torch.all(keep.reshape(6, 4, 4).sum(-1) == 2)
    torch.testing.assert_close(new.double(), _obs_reference(weight, hessian, keep), rtol=1e-4, atol=1e-4)
    # Reconstruction beats keeping the same mask without update, and magnitude pruning at the same sparsity.
    masked = weight * keep
    if nm is None:
        magnitude = weight * (weight.abs() >= weight.abs().flatten().kthvalue(48).values)
    else:  # magnitude 2:4: the two largest of each group of four
        groups = weight.abs().reshape(6, 4, 4)
        magnitude = weight * (groups >= groups.sort(-1).values[..., 2:3]).reshape(6, 16)
    assert _error(weight, new, x) < _error(weight, masked, x)
    assert _error(weight, new, x) < _error(weight, magnitude, x)


def test_sparsegpt_keeps_earlier_pruned_weights_pruned():
    torch.manual_seed(1)
    weight = torch.randn(4, 8)
    x = torch.randn(32, 8)
    before = torch.zeros(4, 8, dtype=torch.bool)
    before[:, 0] = True
    _, keep = sparsegpt_prune_weight(weight * ~before, x.t() @ x, 0.5, pruned_before=before)
    assert not keep[:, 0].any() and int(keep.sum()) == 16


def test_prune_sparsegpt_on_a_model_reconstructs_sequentially():
    calibration = _calibration()
    dense = _tiny_llama()
    out = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = _tiny_llama()
        masks = prune_(model, PruningConfig(method=method, sparsity=0.5), calibration_data=calibration)
        named = dict(model.named_modules())
        zeros = sum(int((named[n].weight == 0).sum()) for n in masks)
        assert zeros == sum(m.numel() for m in masks.values()) // 2
        with torch.no_grad():
            out[method] = float(sum(((model(**b).logits - dense(**b).logits) ** 2).mean() for b in calibration))
        if method == "sparsegpt":
            # Kept weights were rewritten, not only masked.
            w = dict(model.named_modules())["model.layers.1.mlp.down_proj"].weight
            w0 = dict(dense.named_modules())["model.layers.1.mlp.down_proj"].weight
            kept = masks["model.layers.1.mlp.down_proj"]
            assert not torch.allclose(w[kept], w0[kept])
    assert out["sparsegpt"] < out["magnitude"]


def test_sparsegpt_nm_and_callback_path():
    from hf_compress.pruning.scoring import get_scorer_class

    model = _tiny_llama()
    config = PruningConfig(method="sparsegpt", pattern="2:4")
    scorer = get_scorer_class("sparsegpt")()
    scorer.prepare(model, None, _calibration(2), 2)  # the callback prepares, then calls compute_masks
    masks = compute_masks(model, config, scorer=scorer)
    for name, module in dict(model.named_modules()).items():
        if name in masks:
            assert torch.all(masks[name].reshape(masks[name].shape[0], -1, 4).sum(-1) == 2)
            assert torch.all(module.weight[~masks[name]] == 0)
    with pytest.raises(ValueError, match="calibration_data"):
        prune_(_tiny_llama(), PruningConfig(method="sparsegpt"))
