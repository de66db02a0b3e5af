"""Pruning: exact sparsity per scope and pattern, N:M groups, scoring, schedules, the Trainer callback
(zeros survive Adam, logs, resume, save/reload, gradient accumulation, PEFT), LoRA merge and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import lm_dataset, random_token_batch, tiny_gpt2, tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.pytorch_utils import Conv1D

from hf_compress import (
    PruningCallback,
    PruningConfig,
    make_pruning_permanent_,
    merge_lora_keep_sparsity,
    prune_,
    sparsity_report,
    to_semi_structured_sparse_,
)
from hf_compress.pruning.schedule import is_pruning_step, sparsity_at_step
from hf_compress.pruning.unstructured import get_pruning_targets


def _out_in(module):
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


# ----------------------------------------------------------------------------------------------- functional core
@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_layer_scope_exact_sparsity_and_untouched_modules(builder, sparsity):
    model = builder(hidden=64)
    before = {n: p.clone() for n, p in model.named_parameters()}
    masks = prune_(model, PruningConfig(sparsity=sparsity))
    targets = get_pruning_targets(model, PruningConfig())
    assert set(masks) == set(targets)
    for name, module in targets.items():
        numel = module.weight.numel()
        assert int((module.weight == 0).sum()) == round(sparsity * numel), name
        # Kept weights are unchanged, pruned ones are exactly the mask's zeros.
        assert torch.equal(module.weight, before[name + ".weight"] * masks[name])
    for name, param in model.named_parameters():  # embeddings, norms, heads, biases untouched
        if not any(name == t + ".weight" for t in targets):
            assert torch.equal(param, before[name]), name


def test_global_scope_exact_total_with_uneven_layers():
    model = tiny_llama(hidden=64)
    with torch.no_grad():  # make one layer much larger in magnitude: a global threshold spares it
        model.model.layers[0].mlp.down_proj.weight.mul_(10)
    targets = get_pruning_targets(model, PruningConfig())
    all_abs = torch.cat([m.weight.detach().abs().flatten() for m in targets.values()])
    k = round(0.6 * all_abs.numel())
    threshold = all_abs.sort().values[k - 1]  # independent: the k-th smallest magnitude over all layers
    expected = {n: int((m.weight.abs() <= threshold).sum()) for n, m in targets.items()}
    prune_(model, PruningConfig(sparsity=0.6, scope="global"))
    report = sparsity_report(model)
    assert report["target_parameters"] - report["target_nonzero"] == k
    for name, module in targets.items():
        assert int((module.weight == 0).sum()) == expected[name], name
    assert report["modules"]["model.layers.0.mlp.down_proj"]["sparsity"] < 0.1
    assert report["max_layer_sparsity"] > 0.6


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama])
def test_nm_every_group_complies(builder, pattern):
    n, m = map(int, pattern.split(":"))
    model = builder(hidden=64)
    prune_(model, PruningConfig(pattern=pattern))
    for name, module in get_pruning_targets(model, PruningConfig()).items():
        w = _out_in(module)  # (out, in): groups of M consecutive *input* weights
        groups = (w != 0).reshape(w.shape[0], w.shape[1] // m, m).sum(-1)
        assert bool((groups == n).all()), name  # random weights: exactly N survive in every group
    report = sparsity_report(model, pattern=pattern)
    assert report["n_m_compliant"] is True
    assert report["target_sparsity"] == pytest.approx(1 - n / m)


def test_nm_groups_run_along_input_dim_of_conv1d():
    conv = Conv1D(nf=2, nx=4)  # weight stored (in=4, out=2)
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])  # (out, in)
        conv.weight.copy_(w.t())
        lin.weight.copy_(w)
    expected_keep = torch.tensor([[False, False, True, True], [True, True, False, False]])
    for module in (conv, lin):
        holder = nn.Sequential(nn.ModuleList([module]))
        masks = prune_(holder, PruningConfig(pattern="2:4", target_modules=r".*0\.0"))
        assert torch.equal(_out_in(module) != 0, expected_keep)
        assert masks[r"0.0"].shape == module.weight.shape


class _TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 1, bias=False)])

    def forward(self, input_ids=None, **kw):
        return self.layers[0](input_ids)


def test_wanda_keeps_activation_heavy_weights_magnitude_does_not():
    # Weights: column 0 is small but its input feature is 100x larger than the others. Wanda scores
    # |W| * ||X_j||: [0.1*100, 1, 2, 3] -> prunes columns 1, 2 at 50%. Magnitude prunes columns 0, 1.
    def build():
        model = _TwoLinear()
        with torch.no_grad():
            model.layers[0].weight.copy_(torch.tensor([[0.1, 1.0, 2.0, 3.0]]))
        return model

    calibration = [torch.tensor([[100.0, 1.0, 1.0, 1.0], [-100.0, -1.0, 1.0, -1.0]])]
    mag = build()
    prune_(mag, PruningConfig(method="magnitude", sparsity=0.5))
    wanda = build()
    prune_(wanda, PruningConfig(method="wanda", sparsity=0.5), calibration_data=calibration)
    assert (mag.layers[0].weight != 0).tolist() == [[False, False, True, True]]
    assert (wanda.layers[0].weight != 0).tolist() == [[True, False, False, True]]


def test_reparametrize_uses_torch_prune_and_permanent_removes_it():
    model = tiny_gpt2()
    prune_(model, PruningConfig(sparsity=0.5), reparametrize=True)
    attn = model.transformer.h[0].attn.c_attn
    assert hasattr(attn, "weight_orig") and hasattr(attn, "weight_mask")
    with torch.no_grad():
        attn.weight_orig.add_(1.0)  # training the original cannot revive masked weights
    model(**random_token_batch())
    assert int((attn.weight == 0).sum()) == attn.weight.numel() // 2
    make_pruning_permanent_(model)
    assert not hasattr(attn, "weight_orig") and "weight_mask" not in dict(attn.named_buffers())
    assert int((attn.weight == 0).sum()) == attn.weight.numel() // 2
    assert not any("weight_orig" in k for k in model.state_dict())


def test_schedules_against_formulas():
    lin = PruningConfig(sparsity=0.8, schedule="linear", start_step=10, end_step=50, frequency=10)
    cub = PruningConfig(sparsity=0.8, schedule="cubic", start_step=10, end_step=50, frequency=10, initial_sparsity=0.1)
    one = PruningConfig(sparsity=0.8, schedule="oneshot", start_step=7)
    for t in range(0, 70):
        expected_lin = 0.0 if t < 10 else min(1.0, (t - 10) / 40) * 0.8
        expected_cub = 0.0 if t < 10 else 0.8 + (0.1 - 0.8) * (1 - min(1.0, (t - 10) / 40)) ** 3
        assert sparsity_at_step(lin, t) == pytest.approx(expected_lin)
        assert sparsity_at_step(cub, t) == pytest.approx(expected_cub)
        assert sparsity_at_step(one, t) == (0.8 if t >= 7 else 0.0)
    assert [t for t in range(70) if is_pruning_step(lin, t)] == [10, 20, 30, 40, 50]
    assert [t for t in range(70) if is_pruning_step(one, t)] == [7]
    odd = PruningConfig(schedule="linear", start_step=0, end_step=25, frequency=10)
    assert [t for t in range(40) if is_pruning_step(odd, t)] == [0, 10, 20, 25]


# ----------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, "sparsity=1.0"),
        ({"sparsity": -0.1}, "sparsity=-0.1"),
        ({"pattern": "3:2"}, "pattern='3:2'"),
        ({"pattern": "2:0"}, "pattern='2:0'"),
        ({"pattern": "two-four"}, "pattern='two-four'"),
        ({"pattern": "2:4", "sparsity": 0.7}, "does not match pattern"),
        ({"pattern": "2:4", "scope": "global"}, "scope='global'"),
        ({"schedule": "linear", "start_step": 10, "end_step": 5}, "end_step=5"),
        ({"schedule": "linear"}, "end_step=None"),
        ({"method": "magnitud"}, "Did you mean 'magnitude'"),
        ({"scope": "globl"}, "Did you mean 'global'"),
        ({"schedule": "cubicc", "end_step": 3}, "schedule='cubicc'"),
        ({"frequency": 0}, "frequency=0"),
        ({"start_step": -1}, "start_step=-1"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningConfig(**kwargs)


def test_wanda_without_calibration_and_unmatched_targets_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="calibration_data"):
        prune_(tiny_gpt2(), PruningConfig(method="wanda"))
    with pytest.raises(ValueError, match="calibration_data"):
        PruningCallback(PruningConfig(method="wanda"))
    with pytest.raises(ValueError, match="matches no Linear module"):
        prune_(tiny_gpt2(), PruningConfig(target_modules=["q_proj"]))
    # Through the Trainer: the error comes at on_train_begin, before any optimizer step.
    model = tiny_gpt2()
    before = model.transformer.h[0].mlp.c_fc.weight.clone()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=lm_dataset(),
        callbacks=[PruningCallback(PruningConfig(target_modules=["nope"]))],
    )
    with pytest.raises(ValueError, match="'nope' matches no Linear module"):
        trainer.train()
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, before)
    with pytest.raises(ValueError, match="multiple of 3"):
        prune_(tiny_gpt2(), PruningConfig(pattern="1:3"))


def test_semi_structured_needs_cuda_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        to_semi_structured_sparse_(tiny_gpt2())


@pytest.mark.gpu
def test_semi_structured_matches_dense_on_gpu():
    torch.manual_seed(0)
    model = tiny_llama(hidden=128, heads=4, kv_heads=4).half().cuda().eval()
    prune_(model, PruningConfig(pattern="2:4"))
    ids = torch.randint(1, 96, (64, 32), device="cuda")  # semi-structured kernels need batch*seq >= 64ish
    with torch.no_grad():
        dense = model(input_ids=ids).logits.float()
        converted = to_semi_structured_sparse_(model)
        sparse = model(input_ids=ids).logits.float()
    assert len(converted) == 14
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__.startswith("SparseSemiStructured")
    torch.testing.assert_close(sparse, dense, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------------ callback
class _ZeroWatcher(TrainerCallback):
    """Records, after each optimizer step, whether every pruned weight is still exactly zero."""

    def __init__(self, pruning):
        self.pruning, self.ok, self.moved = pruning, [], []

    def on_step_end(self, args, state, control, model=None, **kw):
        targets = get_pruning_targets(model, self.pruning.config)
        self.ok.append(all(bool((targets[n].weight[~m] == 0).all()) for n, m in self.pruning.masks.items()))


def test_callback_zeros_survive_many_adam_steps(tmp_path):
    model = tiny_gpt2()
    pruning = PruningCallback(PruningConfig(sparsity=0.5, schedule="oneshot", start_step=0))
    watcher = _ZeroWatcher(pruning)
    kept_before = model.transformer.h[0].mlp.c_fc.weight.clone()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=25, learning_rate=5e-2, weight_decay=0.1),
        train_dataset=lm_dataset(64),
        callbacks=[pruning, watcher],
    )
    trainer.train()
    assert len(watcher.ok) == 25 and all(watcher.ok)
    w = model.transformer.h[0].mlp.c_fc.weight
    mask = pruning.masks["transformer.h.0.mlp.c_fc"]
    assert int((w == 0).sum()) == w.numel() // 2
    assert not torch.allclose(w[mask], kept_before[mask])  # the kept weights did train
    assert sparsity_report(model)["target_sparsity"] == pytest.approx(0.5)


def _train_gradual(tmp_path, accumulation=1, max_steps=12, **kw):
    model = tiny_llama()
    config = PruningConfig(sparsity=0.6, schedule="cubic", start_step=2, end_step=8, frequency=2)
    pruning = PruningCallback(config)
    args = _args(
        tmp_path,
        max_steps=max_steps,
        gradient_accumulation_steps=accumulation,
        per_device_train_batch_size=4 // accumulation,
        **kw,
    )
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(64), callbacks=[pruning])
    trainer.train()
    return model, pruning, trainer


@pytest.mark.parametrize("accumulation", [1, 2])
def test_callback_gradual_schedule_logs_and_accumulation(tmp_path, accumulation):
    model, pruning, trainer = _train_gradual(tmp_path, accumulation)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == list(range(1, 13))
    targets = [h["sparsity_scheduled"] for h in logs]
    config = pruning.config
    # Targets follow optimizer steps (not micro-batches): last pruning step <= t decides the target.
    expected = [
        sparsity_at_step(config, max(s for s in (2, 4, 6, 8) if s <= t)) if t >= 2 else 0.0 for t in range(1, 13)
    ]
    assert targets == pytest.approx(expected, abs=1e-6)
    sparsities = [h["sparsity_targeted"] for h in logs]
    assert sparsities[0] == 0.0 and sparsities == sorted(sparsities)
    assert sparsities[-1] == pytest.approx(0.6, abs=1e-3)
    assert all(h["sparsity_layer_min"] <= h["sparsity_targeted"] <= h["sparsity_layer_max"] for h in logs)
    report = sparsity_report(model)
    assert report["min_layer_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert report["max_layer_sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_resume_mid_schedule_gives_bit_identical_masks(tmp_path):
    # Uninterrupted run, saving checkpoints; then a fresh model resumes from step 4 (mid-schedule).
    _, full, _ = _train_gradual(tmp_path / "a", save_strategy="steps", save_steps=4)
    ckpt = tmp_path / "a" / "out" / "checkpoint-4"
    assert (ckpt / "pruning_masks.safetensors").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["PruningCallback"]["attributes"]["last_pruning_step"] == 4

    model = tiny_llama(seed=123)  # different init: everything must come from the checkpoint
    resumed = PruningCallback(PruningConfig(sparsity=0.6, schedule="cubic", start_step=2, end_step=8, frequency=2))
    args = _args(tmp_path / "a", max_steps=12, save_strategy="steps", save_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(64), callbacks=[resumed])
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert set(resumed.masks) == set(full.masks)
    for name in full.masks:
        assert torch.equal(resumed.masks[name], full.masks[name]), name
    logs = [h for h in trainer.state.log_history if "loss" in h and h["step"] > 4]
    assert logs[0]["sparsity_scheduled"] == pytest.approx(sparsity_at_step(full.config, 4))
    assert logs[-1]["sparsity_scheduled"] == pytest.approx(0.6)


def test_save_model_reloads_with_from_pretrained_same_sparsity_and_logits(tmp_path):
    model = tiny_gpt2()
    pruning = PruningCallback(PruningConfig(pattern="2:4", schedule="oneshot", start_step=3))
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=6), train_dataset=lm_dataset(), callbacks=[pruning])
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any(k.endswith(("weight_orig", "weight_mask")) for k in keys)
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    model.eval()
    report_a, report_b = sparsity_report(model, pattern="2:4"), sparsity_report(loaded, pattern="2:4")
    assert report_b["n_m_compliant"] and report_b["target_sparsity"] == pytest.approx(0.5)
    assert report_a["nonzero_parameters"] == report_b["nonzero_parameters"]
    batch = random_token_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_peft_lora_prunes_base_layers_and_merge_keeps_sparsity(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0, init_lora_weights=False
        ),
    )
    pruning = PruningCallback(PruningConfig(pattern="2:4"))
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=lm_dataset(), callbacks=[pruning])
    trainer.train()
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in pruning.masks
    assert "base_model.model.model.layers.0.mlp.down_proj" in pruning.masks  # non-LoRA layers too
    assert not any("lora_" in n for n in pruning.masks)
    assert all(bool((p != 0).all()) for n, p in model.named_parameters() if "lora_B" in n)  # adapters stay dense
    merged = merge_lora_keep_sparsity(model)
    report = sparsity_report(merged, pattern="2:4")
    assert report["n_m_compliant"] and report["target_sparsity"] == pytest.approx(0.5)
    # A naive merge would have filled the pruned positions (the LoRA delta is dense).
    naive = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    prune_(naive, PruningConfig(pattern="2:4"))
    assert sparsity_report(naive.merge_and_unload())["modules"]["model.layers.0.self_attn.q_proj"]["sparsity"] < 0.1


def test_wanda_callback_with_calibration_batches(tmp_path):
    calibration = [random_token_batch(seed=i) for i in range(2)]
    pruning = PruningCallback(
        PruningConfig(
            method="wanda",
            sparsity=0.5,
            schedule="linear",
            start_step=0,
            end_step=4,
            frequency=2,
            num_calibration_batches=2,
        ),
        calibration,
    )
    model = tiny_gpt2()
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=6), train_dataset=lm_dataset(), callbacks=[pruning])
    trainer.train()
    assert pruning.last_pruning_step == 4
    assert sparsity_report(model)["target_sparsity"] == pytest.approx(0.5, abs=1e-3)
    # The restored instance (restore_callback_states_from_checkpoint) finds its calibration data by key.
    state = pruning.state()
    clone = PruningCallback(**state["args"])
    assert clone.calibration_data is calibration


def test_callback_in_distillation_trainer(tmp_path):
    try:
        from hf_compress import DistillationConfig, DistillationTrainer
    except (ImportError, AttributeError):
        pytest.skip("DistillationTrainer not available")
    import inspect

    student, teacher = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    pruning = PruningCallback(PruningConfig(sparsity=0.5))
    kwargs = dict(model=student, args=_args(tmp_path, max_steps=3), train_dataset=lm_dataset(), callbacks=[pruning])
    params = inspect.signature(DistillationTrainer.__init__).parameters
    if "teacher_model" in params:
        kwargs["teacher_model"] = teacher
    if "distillation_config" in params:
        kwargs["distillation_config"] = DistillationConfig()
    try:
        trainer = DistillationTrainer(**kwargs)
    except TypeError as e:  # pragma: no cover - the trainer's signature belongs to another module
        pytest.skip(f"DistillationTrainer signature: {e}")
    trainer.train()
    assert sparsity_report(student)["target_sparsity"] == pytest.approx(0.5)
    assert sparsity_report(teacher)["target_sparsity"] == 0.0
