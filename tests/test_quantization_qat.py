"""Quantization-aware training: torchao fake quantization inserted by QATCallback, conversion, save/reload, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import lm_dataset, random_token_batch, tiny_gpt2, tiny_llama
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

pytest.importorskip("torchao")

from torchao.quantization.qat import FakeQuantizedLinear  # noqa: E402
from torchao.utils import TorchAOBaseTensor  # noqa: E402

from hf_compress import QATCallback, QATConfig, convert_qat_, prepare_qat_, save_qat_model  # noqa: E402
from hf_compress.quantization.qat import fake_quantized_module_names  # noqa: E402

HIDDEN = 64


def _args(tmp_path, name="run", **kw):
    defaults = dict(
        output_dir=str(tmp_path / name),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    defaults.update(kw)
    return TrainingArguments(**defaults)


def _model(seed=0):
    return tiny_llama(hidden=HIDDEN, heads=4, kv_heads=2, seed=seed)


class _Probe(TrainerCallback):
    """Records, before each optimizer step, whether fake quantization is active and the optimizer owns its weights."""

    def __init__(self):
        self.active: list[bool] = []
        self.optimizer_owns_weights: list[bool] = []

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        fq = [m for m in model.modules() if isinstance(m, FakeQuantizedLinear)]
        self.active.append(bool(fq))
        if fq:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self.optimizer_owns_weights.append(all(id(m.weight) in owned for m in fq))


def test_prepare_qat_shares_parameters_and_gradients_flow():
    model = _model()
    q_proj = model.model.layers[0].self_attn.q_proj
    weight_before = q_proj.weight
    batch = random_token_batch(vocab=96)
    with torch.no_grad():
        float_logits = model(**batch).logits
    names = prepare_qat_(model, QATConfig(scheme="int8-dynamic-activation-int4-weight", group_size=32))

    # Every Linear inside the blocks is fake-quantized; the head stays full precision.
    assert len(names) == 2 * 7 and all(".layers." in n for n in names)
    assert isinstance(model.model.layers[0].self_attn.q_proj, FakeQuantizedLinear)
    assert not isinstance(model.lm_head, FakeQuantizedLinear)
    assert model.model.layers[0].self_attn.q_proj.weight is weight_before  # same Parameter: optimizer unaffected

    out = model(**batch, labels=batch["input_ids"])
    assert not torch.allclose(out.logits, float_logits)  # the fake quantization really changes the forward pass
    out.loss.backward()
    for name in names:
        grad = model.get_submodule(name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name

    convert_qat_(model)  # back to plain Linear with the same weights
    assert fake_quantized_module_names(model) == []
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert model.model.layers[0].self_attn.q_proj.weight is weight_before


def test_target_and_exclude_modules():
    model = _model()
    names = prepare_qat_(
        model,
        QATConfig(scheme="int8-weight-only", target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.1\..*"),
    )
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


@pytest.mark.parametrize("scheme", ["int8-dynamic-activation-int4-weight", "int4-weight-only", "int8-weight-only"])
def test_save_qat_model_reloads_and_matches_in_memory_conversion(tmp_path, scheme):
    config = QATConfig(scheme=scheme, group_size=32 if "int4" in scheme else None)
    model = _model()
    prepare_qat_(model, config)
    with torch.no_grad():  # move the weights away from their initialisation, as training would
        for name in fake_quantized_module_names(model):
            model.get_submodule(name).weight.mul_(1.3)
    in_memory = copy.deepcopy(model)
    convert_qat_(in_memory, config)
    batch = random_token_batch(vocab=96)
    with torch.no_grad():
        expected = in_memory(**batch).logits

    save_qat_model(model, tmp_path / "q", config)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "q")  # stock from_pretrained, no quantization_config
    assert isinstance(reloaded.model.layers[0].mlp.down_proj.weight, TorchAOBaseTensor)  # integer weights
    assert not isinstance(reloaded.lm_head.weight, TorchAOBaseTensor)  # the head stays full precision
    assert "quantization_config" in reloaded.config.to_dict()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
    # quantized layers are stored as integers: the checkpoint is smaller than the float one
    float_dir = tmp_path / "float"
    _model().save_pretrained(float_dir)
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < (float_dir / "model.safetensors").stat().st_size

    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_qat_model(model, tmp_path / "q", config)


def test_qat_callback_inserts_at_start_step_then_saves_quantized(tmp_path):
    model = _model()
    probe = _Probe()
    qat = QATCallback(scheme="int8-dynamic-activation-int4-weight", group_size=32, start_step=2)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=lm_dataset(n=32), callbacks=[qat, probe])
    weight = model.model.layers[0].mlp.up_proj.weight
    snapshot_at_insert = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                snapshot_at_insert["w"] = weight.detach().clone()

    trainer.add_callback(Snapshot())
    trainer.train()

    assert probe.active == [False, False, True, True]  # full precision for 2 steps, then fake quantization
    assert probe.optimizer_owns_weights == [True, True]
    assert qat.fake_quant_inserted_at == 2 and len(qat.fake_quantized_modules) == 14
    # the optimizer kept updating the (shared) weights while fake quantization was active
    assert model.model.layers[0].mlp.up_proj.weight is weight
    assert not torch.equal(weight.detach(), snapshot_at_insert["w"])
    # after training: plain Linear in memory, the real quantized model on disk
    assert fake_quantized_module_names(trainer.model) == []
    qdir = tmp_path / "run" / "quantized"
    assert qat.quantized_model_dir == str(qdir)
    reloaded = LlamaForCausalLM.from_pretrained(qdir)
    reference = copy.deepcopy(trainer.model)
    config = QATConfig(scheme="int8-dynamic-activation-int4-weight", group_size=32)
    prepare_qat_(reference, config)
    convert_qat_(reference, config)
    batch = random_token_batch(vocab=96)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, reference(**batch).logits)


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_qat_resumed_from_checkpoint_continues_identically(tmp_path):
    data = lm_dataset(n=48)
    common = dict(max_steps=4, save_strategy="steps", save_steps=2)

    def qat():
        return QATCallback(scheme="int4-weight-only", group_size=32, start_step=1)

    full = Trainer(model=_model(), args=_args(tmp_path, "full", **common), train_dataset=data, callbacks=[qat()])
    full_out = full.train()

    interrupted = Trainer(
        model=_model(), args=_args(tmp_path, "part", **common), train_dataset=data, callbacks=[qat(), _StopAt(2)]
    )
    interrupted.train()
    assert interrupted.state.global_step == 2
    checkpoint = tmp_path / "part" / "checkpoint-2"
    assert checkpoint.is_dir()

    last = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h][-1]  # noqa: E731
    # restore_callback_states_from_checkpoint=False (default): the callback passed in decides from global_step;
    # True: the Trainer rebuilds the callback from the arguments and attributes stored in the checkpoint.
    for restore in (False, True):
        name = f"resumed_{restore}"
        args = _args(tmp_path, name, restore_callback_states_from_checkpoint=restore, **common)
        resumed = Trainer(model=_model(), args=args, train_dataset=data, callbacks=[qat()])
        probe = _Probe()
        resumed.add_callback(probe)
        resumed_out = resumed.train(resume_from_checkpoint=str(checkpoint))
        assert probe.active == [True, True]  # re-inserted before the first resumed step
        assert probe.optimizer_owns_weights == [True, True]  # the optimizer state loaded for the same Parameters
        (callback,) = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, QATCallback)]
        assert callback.start_step == 1 and callback.fake_quant_inserted_at == (1 if restore else 2)

        full_sd, resumed_sd = full.model.state_dict(), resumed.model.state_dict()
        for key in full_sd:
            torch.testing.assert_close(resumed_sd[key], full_sd[key], rtol=0, atol=0, msg=key)
        assert last(resumed) == last(full)
        assert resumed_out.global_step == full_out.global_step == 4
        assert (tmp_path / name / "quantized" / "model.safetensors").is_file()

    # QAT changes the trajectory: the same run without fake quantization ends elsewhere (the check above has teeth).
    plain = Trainer(model=_model(), args=_args(tmp_path, "plain", **common), train_dataset=data)
    plain.train()
    assert not torch.equal(
        plain.model.model.layers[0].mlp.up_proj.weight, full.model.model.layers[0].mlp.up_proj.weight
    )


# ---------------------------------------------------------------- bad input


def test_unknown_scheme_suggests_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'int4-weight-only'"):
        QATCallback(scheme="int4-weight-onyl")
    with pytest.raises(ValueError, match="scheme='fp3'"):
        QATConfig(scheme="fp3")


def test_group_size_must_divide_layer_width_and_names_the_layer(tmp_path):
    model = tiny_llama(hidden=48, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match=r"group_size=32 does not divide in_features=48 of layer 'model\.layers\.0"):
        prepare_qat_(model, QATConfig(scheme="int4-weight-only", group_size=32))
    # the callback reports it in on_train_begin, before any step
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=lm_dataset(),
        callbacks=[QATCallback(scheme="int4-weight-only", group_size=32, start_step=2)],
    )
    with pytest.raises(ValueError, match="does not divide"):
        trainer.train()
    assert trainer.state.global_step == 0
    with pytest.raises(ValueError, match="group_size=0"):
        QATConfig(group_size=0)


def test_start_step_beyond_max_steps_fails_before_training(tmp_path):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=4),
        train_dataset=lm_dataset(),
        callbacks=[QATCallback(start_step=10)],
    )
    with pytest.raises(ValueError, match="start_step=10 must be smaller than the run's max_steps=4"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="start_step=-1"):
        QATCallback(start_step=-1)


def test_conv1d_models_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="nn.Linear layers only"):
        prepare_qat_(tiny_gpt2(hidden=64), QATConfig())


def test_missing_torchao_gives_install_hint(monkeypatch):
    import hf_compress.utils.imports as imports

    monkeypatch.setattr(imports, "_is_available", lambda name: name != "torchao")
    with pytest.raises(ImportError, match="pip install"):
        QATCallback()
    with pytest.raises(ImportError, match="torchao"):
        prepare_qat_(_model())


def test_existing_quantized_dir_is_not_overwritten(tmp_path):
    (tmp_path / "run" / "quantized").mkdir(parents=True)
    (tmp_path / "run" / "quantized" / "keep.txt").write_text("x")
    trainer = Trainer(model=_model(), args=_args(tmp_path), train_dataset=lm_dataset(), callbacks=[QATCallback()])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_save_quantized_false_still_removes_fake_quantization(tmp_path):
    model = _model()
    qat = QATCallback(scheme="int4-weight-only", group_size=32, save_quantized=False)
    Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=lm_dataset(n=16), callbacks=[qat]).train()
    assert len(qat.fake_quantized_modules) == 14
    assert fake_quantized_module_names(model) == []
    assert not (tmp_path / "run" / "quantized").exists()


def test_qat_on_a_lora_student_saves_the_merged_quantized_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    qat = QATCallback(scheme="int8-dynamic-activation-int4-weight", group_size=32)
    trainer = Trainer(
        model=peft_model, args=_args(tmp_path, max_steps=3), train_dataset=lm_dataset(n=16), callbacks=[qat]
    )
    trainer.train()
    assert fake_quantized_module_names(peft_model) == []
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())  # the trained adapter is left as it is
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "run" / "quantized")
    reference = copy.deepcopy(peft_model).merge_and_unload()
    config = QATConfig(scheme="int8-dynamic-activation-int4-weight", group_size=32)
    prepare_qat_(reference, config)
    convert_qat_(reference, config)
    batch = random_token_batch(vocab=96)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, reference(**batch).logits)
