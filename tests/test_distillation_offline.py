"""Offline distillation: cache_teacher_logits, sparse-target losses and DistillationTrainer(teacher_model=None)."""

from __future__ import annotations

import copy
import json
import math

import datasets
import pytest
import torch
from tiny_models import VOCAB, tiny_bert, tiny_llama
from transformers import TrainerCallback

from hf_compress import (
    DistillationConfig,
    DistillationTrainer,
    cache_teacher_logits,
    forward_kl_loss,
    sparse_distillation_loss,
    sparse_forward_kl_and_cross_entropy,
)
from hf_compress.distillation.cache import MANIFEST_FILE, SHARDS_DIR, sampled_targets

COMMON = dict(report_to="none", use_cpu=True, save_strategy="no", seed=0, logging_steps=1, disable_tqdm=True)


def _args(tmp_path, **kw):
    return DistillationConfig(output_dir=str(tmp_path / "out"), **{**COMMON, **kw})


def _lm_rows(n=8, seed=0, min_len=6, max_len=14, ignore_prefix=True):
    """Ragged causal-LM rows; some start with a prompt labelled -100."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        # labels[0] is never predicted, except from a left pad, where the online path reads the teacher's
        # distribution at a padding position (no cached target exists there): -100 keeps both paths comparable.
        labels = [-100] + ids[1:]
        if ignore_prefix and i % 2:
            labels[:3] = [-100] * 3
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["labels"].append(labels)
    return datasets.Dataset.from_dict(rows)


class _PadCollator:
    """Pads input_ids / attention_mask with 0 and labels with -100, on the right or on the left."""

    def __init__(self, side="right"):
        self.side = side

    def __call__(self, features):
        width = max(len(f["input_ids"]) for f in features)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = width - len(f["input_ids"])
            for key, value in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
                row = [int(x) for x in f[key]]
                out[key].append([value] * pad + row if self.side == "left" else row + [value] * pad)
        return {k: torch.tensor(v) for k, v in out.items()}


def _cache(teacher, dataset, folder, **kw):
    kw = {"temperature": 2.0, "batch_size": 3, "shard_size": 4, "progress": False, **kw}
    return cache_teacher_logits(teacher, dataset, folder, **kw)


def _one_batch_loss_and_grads(trainer, model, dataset, num_items):
    batch = next(iter(trainer.get_eval_dataloader(dataset)))
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(num_items))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------- exactness at k = V
@pytest.mark.parametrize(
    "loss_type,side", [("forward_kl", "right"), ("forward_kl", "left"), ("reverse_kl", "right"), ("jsd", "right")]
)
def test_topk_with_full_vocabulary_reproduces_the_online_loss_and_gradient(tmp_path, loss_type, side):
    teacher = tiny_llama(seed=1)
    rows = _lm_rows(n=6)
    cached = _cache(teacher, rows, tmp_path / "c", top_k=VOCAB, probability_dtype="float32").dataset
    hp = dict(alpha=0.5, temperature=2.0, loss_type=loss_type, per_device_eval_batch_size=6)
    student = tiny_llama(layers=1, seed=2)
    online = DistillationTrainer(
        model=student, teacher_model=teacher, args=_args(tmp_path, **hp), data_collator=_PadCollator(side)
    )
    offline_student = copy.deepcopy(student)
    offline = DistillationTrainer(
        model=offline_student,
        teacher_model=None,
        args=_args(tmp_path, **hp),
        train_dataset=cached,
        data_collator=_PadCollator(side),
    )
    assert offline.teacher_model is None
    loss_on, grads_on = _one_batch_loss_and_grads(online, student, rows, num_items=57)
    loss_off, grads_off = _one_batch_loss_and_grads(offline, offline_student, cached, num_items=57)
    torch.testing.assert_close(loss_off, loss_on, rtol=1e-5, atol=1e-6)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 5
    for name in grads_on:
        torch.testing.assert_close(grads_off[name], grads_on[name], rtol=1e-4, atol=1e-6, msg=name)


def test_topk_full_vocabulary_per_example_classification_matches_online(tmp_path):
    teacher = tiny_bert(num_labels=3, seed=1)
    g = torch.Generator().manual_seed(0)
    rows = datasets.Dataset.from_dict(
        {
            "input_ids": torch.randint(1, VOCAB, (8, 10), generator=g).tolist(),
            "attention_mask": [[1] * 10] * 8,
            "labels": [i % 3 for i in range(8)],
        }
    )
    result = _cache(teacher, rows, tmp_path / "c", probability_dtype="float32")
    assert result.spec.task == "sequence-classification" and result.spec.k == 3 and not result.spec.rest
    assert result.num_positions == 8  # one target per example
    hp = dict(alpha=0.5, temperature=2.0, per_device_eval_batch_size=8)
    student = tiny_bert(num_labels=3, layers=1, seed=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    online = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, **hp))
    offline_student = copy.deepcopy(student)
    offline = DistillationTrainer(
        model=offline_student, teacher_model=None, args=_args(tmp_path, **hp), train_dataset=result.dataset
    )
    loss_on, grads_on = _one_batch_loss_and_grads(online, student, rows, num_items=8)
    loss_off, grads_off = _one_batch_loss_and_grads(offline, offline_student, result.dataset, num_items=8)
    torch.testing.assert_close(loss_off, loss_on, rtol=1e-5, atol=1e-6)
    for name in grads_on:
        torch.testing.assert_close(grads_off[name], grads_on[name], rtol=1e-4, atol=1e-6, msg=name)


# -------------------------------------------------------------------------------------------- the pure losses
def _bins_forward_kl_formula(student, ids, probs, rest, temperature):
    """The (k + 1)-bin forward KL times T², written out in float64 one row at a time."""
    total = 0.0
    for s, i, p, r in zip(student.double(), ids, probs.double(), rest.double()):
        q = torch.softmax(s / temperature, -1)
        off = torch.ones_like(q, dtype=torch.bool)
        off[i] = False
        t = torch.cat([p, r[None]]) / (p.sum() + r)
        b = torch.cat([q[i], q[off].sum()[None]])  # the tail summed, not 1 - sum(q_k): that cancels near 1
        total = total + (t * (t.log() - b.log())).sum() * temperature**2
    return total


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_sparse_forward_kl_on_topk_bins_matches_the_formula_and_autograd(temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 11, generator=g, dtype=torch.float64).float().requires_grad_()
    teacher = torch.randn(5, 11, generator=g) * 2
    t_probs = torch.softmax(teacher / temperature, -1)
    probs, ids = t_probs.topk(4, -1)
    rest = 1 - probs.sum(-1)
    labels = torch.randint(0, 11, (5,), generator=g)
    mask = torch.tensor([True, True, False, True, True])
    with torch.no_grad():  # row 1: a student sure of the teacher's top 4 (mass 1e-13 elsewhere, far below fp32's eps)
        student[1] = 0.0
        student[1, ids[1]] = 30.0 + torch.arange(4.0)

    total, kl, ce = sparse_forward_kl_and_cross_entropy(
        student, ids, probs, rest, None, labels, temperature=temperature, alpha=0.3, mask=mask, chunk_elements=22
    )
    (grad_fused,) = torch.autograd.grad(total, student)
    expected_kl = _bins_forward_kl_formula(student[mask], ids[mask], probs[mask], rest[mask], temperature)
    expected_ce = torch.nn.functional.cross_entropy(student[mask].double(), labels[mask], reduction="sum")
    torch.testing.assert_close(kl.double(), expected_kl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce.double(), expected_ce.detach(), rtol=1e-5, atol=1e-6)
    reference = 0.3 * _bins_forward_kl_formula(student[mask], ids[mask], probs[mask], rest[mask], temperature)
    reference = reference + 0.7 * torch.nn.functional.cross_entropy(
        student[mask].double(), labels[mask], reduction="sum"
    )
    (grad_reference,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(grad_fused, grad_reference.float(), rtol=1e-4, atol=1e-6)
    # the autograd (k + 1)-bin path agrees with the fused one
    bins = sparse_distillation_loss(student, ids, probs, rest, "forward_kl", temperature, mask=mask, reduction="sum")
    torch.testing.assert_close(bins, kl, rtol=1e-5, atol=1e-6)


def test_sparse_losses_refuse_what_they_cannot_compute():
    s, ids, p = torch.randn(2, 5), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3) / 3
    with pytest.raises(ValueError, match="loss_type='mse' is not defined on sparse"):
        sparse_distillation_loss(s, ids, p, loss_type="mse")
    with pytest.raises(ValueError, match="targets hold 2 positions .* the student logits have 3"):
        sparse_distillation_loss(torch.randn(3, 5), ids, p)
    with pytest.raises(ValueError, match="labels are needed"):
        sparse_forward_kl_and_cross_entropy(s, ids, p, alpha=0.5)


def test_sampled_estimator_mean_gradient_approaches_the_full_forward_kl_gradient():
    """Anshumann et al.: with draws from the teacher at temperature T, E[gradient] = the full forward-KL gradient."""
    g = torch.Generator().manual_seed(0)
    vocab, positions, k, temperature = 7, 3, 8, 2.0
    teacher = torch.randn(positions, vocab, generator=g) * 2
    student = torch.randn(positions, vocab, generator=g).requires_grad_()
    full = forward_kl_loss(student, teacher, temperature, reduction="sum")
    (exact,) = torch.autograd.grad(full, student)
    p = torch.softmax(teacher / temperature, -1)

    def mean_gradient(draws: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        ids, counts, num_unique, neg_entropy = sampled_targets(
            teacher.repeat(draws, 1), k, temperature, generator=generator
        )
        assert torch.all(torch.stack([c.sum() for c in counts.split(num_unique.tolist())]) == k)
        dense = torch.zeros(draws * positions, vocab)
        rows = torch.repeat_interleave(torch.arange(draws * positions), num_unique)
        dense[rows, ids] = counts.float() / k  # unique ids per row, so plain assignment
        repeated = student.detach().repeat(draws, 1).requires_grad_()
        total, _, _ = sparse_forward_kl_and_cross_entropy(
            repeated,
            torch.arange(vocab).expand(draws * positions, vocab),
            dense,
            neg_entropy=neg_entropy,
            temperature=temperature,
            alpha=1.0,
        )
        (grad,) = torch.autograd.grad(total, repeated)
        return grad.view(draws, positions, vocab).mean(0)

    errors = {}
    for draws in (50, 3200):
        error = (mean_gradient(draws, seed=draws) - exact).abs()
        # the gradient is T (q - counts / k): its mean's standard deviation is T sqrt(p (1 - p) / (k draws))
        sigma = temperature * (p * (1 - p) / (k * draws)).sqrt()
        assert torch.all(error <= 5 * sigma + 1e-6), (draws, error.max().item(), sigma.max().item())
        errors[draws] = error.max().item()
    assert errors[3200] < errors[50] / 3


# ------------------------------------------------------------------------------------------------- the cache
def test_cache_columns_bytes_and_sampled_counts(tmp_path):
    teacher = tiny_llama(seed=1)
    rows = _lm_rows(n=7)
    tokens = sum(len(x) for x in rows["input_ids"])
    topk = _cache(teacher, rows, tmp_path / "topk", top_k=8)
    reloaded = datasets.load_from_disk(str(tmp_path / "topk"))
    assert reloaded.column_names == topk.dataset.column_names and len(reloaded) == 7
    assert reloaded.features["teacher_token_ids"].feature.dtype == "uint16"
    assert reloaded.features["teacher_token_probs"].feature.dtype == "float16"
    assert topk.num_positions == tokens
    # 8 ids (2 bytes) + 8 probabilities (2 bytes) + the rest mass (2 bytes), plus a hash and the settings per row
    assert 34 <= topk.bytes_per_token < 34 + 200 / min(len(x) for x in rows["input_ids"])
    assert topk.target_bytes == round(topk.bytes_per_token * tokens)
    row = reloaded[0]
    probs, rest = torch.tensor(row["teacher_token_probs"]).view(-1, 8), torch.tensor(row["teacher_rest_mass"])
    torch.testing.assert_close(probs.sum(-1) + rest, torch.ones(len(rest)), atol=3e-3, rtol=0)
    assert torch.all(probs[:, :-1] >= probs[:, 1:])  # sorted, most probable first
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0]
    expected = torch.softmax(logits / 2.0, -1).topk(8, -1)
    assert torch.equal(torch.tensor(row["teacher_token_ids"]).view(-1, 8), expected.indices)
    torch.testing.assert_close(probs, expected.values, atol=1e-3, rtol=1e-3)

    sampled = _cache(teacher, rows, tmp_path / "sampled", method="sampled", num_samples=32)
    row = sampled.dataset[0]
    entries = torch.tensor(row["teacher_num_entries"])
    counts = torch.tensor(row["teacher_token_counts"]).split(entries.tolist())
    ids = torch.tensor(row["teacher_token_ids"]).split(entries.tolist())
    assert all(c.sum() == 32 for c in counts) and all(len(set(i.tolist())) == len(i) for i in ids)
    assert sampled.bytes_per_token == pytest.approx(sampled.target_bytes / tokens)


def _counting(teacher, fail_at=None):
    calls = {"n": 0}
    forward = teacher.forward

    def counted(*args, **kwargs):
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise RuntimeError("simulated interruption")
        return forward(*args, **kwargs)

    teacher.forward = counted
    return calls


@pytest.mark.parametrize("method", ["topk", "sampled"])
def test_resume_after_an_interruption_recomputes_only_unfinished_shards(tmp_path, method):
    rows = _lm_rows(n=10)  # shards of 3 rows: [0, 3) [3, 6) [6, 9) [9, 10); batches of 2: 2 + 2 + 2 + 1 calls
    kw = dict(method=method, shard_size=3, batch_size=2, **({"top_k": 8} if method == "topk" else {"num_samples": 16}))
    reference = _cache(tiny_llama(seed=1), rows, tmp_path / "reference", **kw).dataset

    teacher = tiny_llama(seed=1)
    calls = _counting(teacher, fail_at=5)  # the first batch of shard 2
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _cache(teacher, rows, tmp_path / "c", **kw)
    manifest = json.loads((tmp_path / "c" / MANIFEST_FILE).read_text())
    assert sorted(manifest["shards"]) == ["0", "1"] and not manifest["complete"]

    teacher = tiny_llama(seed=1)
    calls = _counting(teacher)
    result = _cache(teacher, rows, tmp_path / "c", **kw)
    assert calls["n"] == 3 and result.shards_computed == 2 and result.shards_reused == 2
    assert result.dataset.to_dict() == reference.to_dict()  # sampled: one seeded generator per shard
    assert not (tmp_path / "c" / SHARDS_DIR).exists()  # removed once the final dataset is written

    calls = _counting(teacher)
    again = _cache(teacher, rows, tmp_path / "c", **kw)  # complete and verified: nothing to compute
    assert calls["n"] == 0 and again.shards_computed == 0

    with pytest.raises(ValueError, match="holds a teacher cache made with temperature=2.0 \\(now 1.0\\)"):
        _cache(teacher, rows, tmp_path / "c", **{**kw, "temperature": 1.0})


def test_resume_verifies_finished_shards_and_recomputes_a_damaged_one(tmp_path):
    rows = _lm_rows(n=10)
    kw = dict(top_k=8, shard_size=3, batch_size=2, keep_shards=True)
    teacher = tiny_llama(seed=1)
    _counting(teacher, fail_at=5)
    with pytest.raises(RuntimeError):
        _cache(teacher, rows, tmp_path / "c", **kw)
    shard0 = tmp_path / "c" / SHARDS_DIR / "shard-00000"
    for data_file in shard0.glob("*.arrow"):
        data_file.write_bytes(b"truncated")
    calls = _counting(teacher)
    result = _cache(teacher, rows, tmp_path / "c", **kw)
    assert calls["n"] == 2 + 2 + 1 and result.shards_reused == 1  # shard 0 again, shards 2 and 3
    # a dataset changed in shard 1's rows: that shard no longer verifies and is recomputed, the others are reused
    changed = rows.map(lambda r, i: {"input_ids": [5] + r["input_ids"][1:]} if i == 4 else r, with_indices=True)
    calls = _counting(teacher)
    result = _cache(teacher, changed, tmp_path / "c", **kw)
    assert calls["n"] == 2 and result.shards_computed == 1 and result.shards_reused == 3


def test_cache_argument_errors(tmp_path):
    teacher, rows = tiny_llama(seed=1), _lm_rows(n=2)
    cases = [
        (dict(method="topp"), "method='topp' is not supported"),
        (dict(top_k=VOCAB + 1), f"top_k={VOCAB + 1} exceeds the teacher's vocabulary of {VOCAB}"),
        (dict(method="sampled", top_k=4), "top_k=4 is for method='topk'"),
        (dict(num_samples=4), "num_samples=4 is for method='sampled'"),
        (dict(temperature=0), "temperature=0 must be a number > 0"),
        (dict(batch_size=0), "batch_size=0 must be an integer >= 1"),
        (dict(probability_dtype="int8"), "probability_dtype='int8' is not supported"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            _cache(teacher, rows, tmp_path / "c", **kwargs)
    with pytest.raises(TypeError, match="datasets.Dataset"):
        _cache(teacher, list(rows), tmp_path / "c")
    with pytest.raises(ValueError, match="no 'input_ids' column"):
        _cache(teacher, rows.remove_columns("input_ids"), tmp_path / "c")


# ------------------------------------------------------------------------------- refusing a mismatching cache
@pytest.fixture(scope="module")
def cached_lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    topk = _cache(tiny_llama(seed=1), _lm_rows(n=6), folder / "topk", top_k=8).dataset
    sampled = _cache(tiny_llama(seed=1), _lm_rows(n=6), folder / "sampled", method="sampled", num_samples=8).dataset
    return {"topk": topk, "sampled": sampled}


def _offline(tmp_path, dataset, student=None, **kw):
    return DistillationTrainer(
        model=student or tiny_llama(layers=1, seed=2),
        teacher_model=None,
        args=_args(tmp_path, **{"temperature": 2.0, **kw}),
        train_dataset=dataset,
        data_collator=_PadCollator(),
    )


def test_mismatching_caches_are_refused_before_training(tmp_path, cached_lm):
    topk, sampled = cached_lm["topk"], cached_lm["sampled"]
    other_ids = topk.map(
        lambda r, i: {"input_ids": [(r["input_ids"][0] + 1) % VOCAB] + r["input_ids"][1:]} if i == 3 else r,
        with_indices=True,
    )
    shorter = topk.map(
        lambda r, i: {k: r[k][:-1] for k in ("input_ids", "attention_mask", "labels")} if i == 2 else r,
        with_indices=True,
    )
    length = len(topk[2]["input_ids"])
    cases = [
        (dict(dataset=other_ids), "row 3: input_ids differ from the token ids the teacher targets were cached for"),
        (
            dict(dataset=shorter),
            f"row 2: the cached teacher targets hold {length} positions but input_ids has {length - 1}",
        ),
        (
            dict(dataset=topk, student=tiny_llama(layers=1, vocab=128)),
            "vocabulary of 96 tokens but the student has 128",
        ),
        (dict(dataset=topk, temperature=1.0), "cached at temperature 2.0 but DistillationConfig.temperature=1.0"),
        (dict(dataset=topk, loss_type="mse"), "loss_type='mse' compares raw teacher logits"),
        (dict(dataset=sampled, loss_type="reverse_kl"), "loss_type='reverse_kl' is not defined on sampled"),
        (dict(dataset=sampled, loss_type="jsd"), "loss_type='jsd' is not defined on sampled"),
        (dict(dataset=topk, hidden_loss_weight=1.0), "hidden_loss_weight=1.0 needs the teacher's hidden states"),
        (dict(dataset=topk.remove_columns("teacher_cache_config")), "no 'teacher_cache_config' column"),
        (dict(dataset=_lm_rows(n=2)), "needs a teacher .* train_dataset has none"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            _offline(tmp_path, **kwargs)


def test_a_mismatching_row_is_refused_by_the_collator_too(cached_lm):
    from hf_compress.distillation.offline import CachedTargetsCollator

    collator = CachedTargetsCollator(_PadCollator())
    rows = [dict(cached_lm["topk"][i]) for i in range(2)]
    batch = collator(rows)
    assert batch["teacher_token_ids"].shape == (2, batch["input_ids"].shape[1], 8)
    rows[1]["input_ids"] = [(rows[1]["input_ids"][0] + 1) % VOCAB] + rows[1]["input_ids"][1:]
    with pytest.raises(ValueError, match="batch row 1: input_ids differ"):
        collator(rows)


# -------------------------------------------------------------------------------------------- training runs
def test_gradient_accumulation_gives_the_same_update_from_sampled_targets(tmp_path, cached_lm):
    results = []
    for bs, ga in [(6, 1), (2, 3)]:
        student = tiny_llama(layers=1, seed=2)
        _offline(
            tmp_path,
            cached_lm["sampled"],
            student=student,
            max_steps=1,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0,
            lr_scheduler_type="constant",
        ).train()
        results.append(student.state_dict())
    before = tiny_llama(layers=1, seed=2).state_dict()
    assert max((results[0][k] - before[k]).abs().max() for k in before) > 1e-3
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("callback", ["pruning", "qat"])
def test_pruning_and_qat_callbacks_train_from_cached_targets(tmp_path, callback):
    from hf_compress import PruningCallback, PruningConfig

    teacher = tiny_llama(hidden=64, layers=2, seed=1)
    cached = _cache(teacher, _lm_rows(n=8), tmp_path / "c", top_k=16).dataset
    student = tiny_llama(hidden=64, layers=1, seed=2)
    before = copy.deepcopy(student.state_dict())
    if callback == "pruning":
        cb = PruningCallback(PruningConfig(sparsity=0.5))
    else:
        pytest.importorskip("torchao")
        from hf_compress import QATCallback

        cb = QATCallback(scheme="int8-dynamic-activation-int4-weight", group_size=32, start_step=0)
    fake_quantized = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            fake_quantized.append(any(type(m).__name__ == "FakeQuantizedLinear" for m in model.modules()))

    trainer = DistillationTrainer(
        model=student,
        teacher_model=None,
        args=_args(tmp_path, temperature=2.0, max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3),
        train_dataset=cached,
        eval_dataset=_lm_rows(n=4, seed=5),  # no cache: scored with the task loss alone
        data_collator=_PadCollator(),
        callbacks=[cb, Probe()],
    )
    trainer.train()
    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert math.isfinite(logs["loss"]) and logs["loss_distill"] > 0 and logs["loss_task"] > 0
    model = trainer.model
    if callback == "pruning":
        weight = model.model.layers[0].mlp.up_proj.weight
        assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
        assert any("sparsity" in k for k in logs)
    else:
        assert fake_quantized == [True]  # the step trained through torchao's fake quantization
    moved = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert moved
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and "eval_loss_task" in metrics


@pytest.mark.multiprocess
def test_ddp_two_processes_train_from_cached_targets(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    _cache(tiny_llama(seed=1), _lm_rows(n=16), tmp_path / "cache", method="sampled", num_samples=16)
    script = Path(__file__).parent / "scripts" / "ddp_offline_distill.py"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519"]
    proc = subprocess.run(
        cmd + [str(script), str(tmp_path), str(tmp_path / "cache")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    info = json.loads((tmp_path / "rank0.json").read_text())
    assert info["world_size"] == 2 and info["changed"] and len(info["loss_distill"]) == 3
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
