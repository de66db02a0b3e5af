"""Post-training quantization: quantize_model (bitsandbytes / torchao) and PostTrainingQuantizationCallback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import classification_dataset, random_token_batch, tiny_bert, tiny_llama
from transformers import BertForSequenceClassification, LlamaForCausalLM, Trainer, TrainingArguments

from hf_compress import PostTrainingQuantizationCallback, quantize_model

HIDDEN = 64


def _bert():
    return tiny_bert(hidden=HIDDEN, heads=4)


def _accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def _args(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    defaults.update(kw)
    return TrainingArguments(**defaults)


@pytest.mark.parametrize(
    ("method", "layer_type"),
    [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt")],
)
def test_bitsandbytes_methods_run_on_cpu_and_round_trip(tmp_path, method, layer_type):
    pytest.importorskip("bitsandbytes")
    model = _bert()
    batch = random_token_batch(vocab=96)
    with torch.no_grad():
        reference = model(**batch).logits
    quantized = quantize_model(model, method, output_dir=tmp_path / method)

    assert type(quantized.bert.encoder.layer[0].attention.self.query).__name__ == layer_type
    assert type(quantized.classifier) is torch.nn.Linear  # the head stays full precision
    assert type(model.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear  # input model untouched
    assert quantized.get_memory_footprint() < model.get_memory_footprint()
    with torch.no_grad():
        logits = quantized(**batch).logits.float()
    assert torch.isfinite(logits).all()
    assert (logits - reference).abs().max() < 0.2  # close to full precision, not identical
    config = json.loads((tmp_path / method / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / method, device_map="cpu")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits.float(), logits, rtol=0, atol=1e-4)


def test_nf4_defaults_follow_qlora_recipe():
    pytest.importorskip("bitsandbytes")
    quantized = quantize_model(_bert(), "nf4")
    qc = quantized.config.quantization_config
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    assert "bfloat16" in str(qc["bnb_4bit_compute_dtype"])
    assert "classifier" in qc["llm_int8_skip_modules"]
    int8 = quantize_model(_bert(), "int8", llm_int8_threshold=4.0).config.quantization_config
    int8 = int8.to_dict() if hasattr(int8, "to_dict") else int8
    assert int8["llm_int8_threshold"] == 4.0


@pytest.mark.parametrize("method", ["torchao-int8", "torchao-int4"])
def test_torchao_methods_round_trip(tmp_path, method):
    pytest.importorskip("torchao")
    from torchao.utils import TorchAOBaseTensor

    model = tiny_llama(hidden=HIDDEN)
    batch = random_token_batch(vocab=96)
    quantized = quantize_model(model, method, group_size=32, output_dir=tmp_path / "q")
    assert isinstance(quantized.model.layers[0].mlp.up_proj.weight, TorchAOBaseTensor)
    assert not isinstance(quantized.lm_head.weight, TorchAOBaseTensor)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        expected, reference = quantized(**batch).logits, model(**batch).logits
        assert torch.equal(reloaded(**batch).logits, expected)
    assert not torch.equal(expected, reference) and (expected - reference).abs().max() < 0.5


def test_quantize_model_from_a_checkpoint_path(tmp_path):
    pytest.importorskip("torchao")
    tiny_llama(hidden=HIDDEN).save_pretrained(tmp_path / "fp")
    quantized = quantize_model(tmp_path / "fp", "torchao-int8")
    assert isinstance(quantized, LlamaForCausalLM)
    assert type(quantized.model.layers[0].mlp.up_proj.weight).__name__ != "Parameter"


def test_ptq_callback_writes_both_models_and_both_metric_sets(tmp_path):
    pytest.importorskip("bitsandbytes")
    model = _bert()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=classification_dataset(n=48),
        eval_dataset=classification_dataset(n=32, seed=1),
        compute_metrics=_accuracy,
    )
    callback = PostTrainingQuantizationCallback("nf4", trainer=trainer)
    trainer.add_callback(callback)
    trainer.train()

    out = tmp_path / "run"
    assert (out / "model.safetensors").is_file() and (out / "ptq_nf4" / "model.safetensors").is_file()
    assert BertForSequenceClassification.from_pretrained(out).config.to_dict().get("quantization_config") is None
    reloaded = BertForSequenceClassification.from_pretrained(out / "ptq_nf4", device_map="cpu")
    assert type(reloaded.bert.encoder.layer[0].output.dense).__name__ == "Linear4bit"

    logged = [h for h in trainer.state.log_history if "ptq_nf4_accuracy" in h]
    assert len(logged) == 1
    logs = logged[0]
    for key in ("eval_loss", "eval_accuracy", "ptq_nf4_loss", "ptq_nf4_accuracy"):
        assert np.isfinite(logs[key]), key
    assert 0.0 <= logs["ptq_nf4_accuracy"] <= 1.0
    assert logs["ptq_nf4_loss"] != logs["eval_loss"]  # the quantized copy really is a different model
    # the full-precision metrics are those of the trained model, the trainer's own evaluation agrees
    assert logs["eval_accuracy"] == pytest.approx(trainer.evaluate()["eval_accuracy"])
    assert logs["ptq_nf4_disk_bytes"] < logs["full_precision_disk_bytes"]
    assert logs["ptq_nf4_memory_footprint_bytes"] < logs["full_precision_memory_footprint_bytes"]
    assert type(trainer.model.bert.encoder.layer[0].output.dense) is torch.nn.Linear  # trained model untouched
    assert callback.metrics == {k: v for k, v in logs.items() if k not in ("epoch", "step")}


def test_ptq_callback_without_trainer_reuses_the_eval_dataloader(tmp_path):
    pytest.importorskip("torchao")
    trainer = Trainer(
        model=_bert(),
        args=_args(tmp_path, eval_strategy="steps", eval_steps=3),
        train_dataset=classification_dataset(n=48),
        eval_dataset=classification_dataset(n=32, seed=1),
        compute_metrics=_accuracy,
        callbacks=[PostTrainingQuantizationCallback("torchao-int4", compute_metrics=_accuracy, group_size=32)],
    )
    trainer.train()
    (logs,) = [h for h in trainer.state.log_history if "ptq_torchao_int4_accuracy" in h]
    trainer_eval = [h for h in trainer.state.log_history if "eval_accuracy" in h and "ptq_torchao_int4_loss" not in h]
    assert logs["eval_accuracy"] == pytest.approx(trainer_eval[-1]["eval_accuracy"])
    assert logs["eval_loss"] == pytest.approx(trainer_eval[-1]["eval_loss"], rel=1e-5)
    assert (tmp_path / "run" / "ptq_torchao_int4" / "model.safetensors").is_file()


# ---------------------------------------------------------------- bad input


def test_unknown_method_suggests_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'nf4'"):
        quantize_model(_bert(), "nf5")
    with pytest.raises(ValueError, match="method='int3'"):
        PostTrainingQuantizationCallback("int3")
    with pytest.raises(ValueError, match="compute_dtype='float8'"):
        quantize_model(_bert(), "nf4", compute_dtype="float8")
    with pytest.raises(ValueError, match="llm_int8_threshold=0"):
        PostTrainingQuantizationCallback("int8", llm_int8_threshold=0)


def test_torchao_group_size_must_divide_layer_width():
    pytest.importorskip("torchao")
    with pytest.raises(ValueError, match=r"group_size=48 does not divide in_features=64 of layer 'model\.layers\.0"):
        quantize_model(tiny_llama(hidden=HIDDEN), "torchao-int4", group_size=48)


@pytest.mark.parametrize(("method", "backend"), [("nf4", "bitsandbytes"), ("torchao-int4", "torchao")])
def test_missing_backend_gives_install_hint(monkeypatch, method, backend):
    import hf_compress.utils.imports as imports

    monkeypatch.setattr(imports, "_is_available", lambda name: name != backend)
    with pytest.raises(ImportError, match=f"`{backend}`.*pip install"):
        quantize_model(_bert(), method)
    with pytest.raises(ImportError, match="pip install"):
        PostTrainingQuantizationCallback(method)


def test_ptq_callback_needs_eval_data_or_the_trainer(tmp_path):
    trainer = Trainer(
        model=_bert(),
        args=_args(tmp_path),
        train_dataset=classification_dataset(n=16),
        callbacks=[PostTrainingQuantizationCallback("torchao-int8")],
    )
    with pytest.raises(ValueError, match="eval_dataset, which is None"):  # checked before the first step
        trainer.train()
    assert trainer.state.global_step == 0
