"""GGUF loading wherever hf_compress takes a model name or path, on a tiny Llama written as a GGUF file."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

from tiny_gguf import tiny_llama_for_gguf, write_llama_gguf  # noqa: E402

from hf_compress.utils.loading import (  # noqa: E402
    gguf_to_folder,
    is_gguf,
    load_pretrained,
    load_tokenizer,
    split_gguf,
)


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    model = tiny_llama_for_gguf()
    path = write_llama_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return model, path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(2, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def test_split_and_detect(gguf_model, tmp_path):
    _, path = gguf_model
    assert split_gguf(path) == (str(path.parent), path.name)
    assert split_gguf(path.parent, path.name) == (str(path.parent), path.name)
    assert split_gguf("some/folder") == ("some/folder", None)
    assert is_gguf(path) and is_gguf("x", "f.gguf") and not is_gguf(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        split_gguf(tmp_path / "missing.gguf")


def test_load_pretrained_dequantizes_and_strips_marking(gguf_model, tmp_path):
    model, path = gguf_model
    for loaded in (load_pretrained(path), load_pretrained(path.parent, gguf_file=path.name)):
        assert type(loaded).__name__ == "LlamaForCausalLM"
        assert getattr(loaded.config, "quantization_config", None) is None
        assert getattr(loaded, "hf_quantizer", None) is None
        torch.testing.assert_close(_logits(loaded, IDS), _logits(model, IDS), rtol=0, atol=0)
    # saves like any model, and the folder reloads with stock from_pretrained
    loaded.save_pretrained(tmp_path / "saved")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(_logits(again, IDS), _logits(model, IDS), rtol=0, atol=0)
    with pytest.raises(ValueError, match="gguf_to_folder"):
        load_pretrained(path, quantization_config=object())


def test_tokenizer_and_cached_folder(gguf_model, tmp_path):
    model, path = gguf_model
    assert load_tokenizer(path)("abc")["input_ids"] == [64, 65, 66]
    folder = gguf_to_folder(path, cache_dir=tmp_path)
    assert gguf_to_folder(path, cache_dir=tmp_path) == folder  # cached: converted once
    assert gguf_to_folder(tmp_path) == str(tmp_path)  # not GGUF: unchanged
    torch.testing.assert_close(_logits(load_pretrained(folder), IDS), _logits(model, IDS), rtol=0, atol=0)


def test_distillation_trainer_teacher_from_gguf(gguf_model, tmp_path):
    from hf_compress import DistillationConfig, DistillationTrainer

    model, path = gguf_model
    student = tiny_llama_for_gguf(seed=1)
    args = DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    trainer = DistillationTrainer(model=student, teacher_model=str(path), args=args, train_dataset=[])
    torch.testing.assert_close(_logits(trainer.teacher_model, IDS), _logits(model, IDS), rtol=0, atol=0)


def test_create_student_from_gguf_path(gguf_model):
    from hf_compress import create_student

    _, path = gguf_model
    student = create_student(str(path), num_layers=1)
    assert student.config.num_hidden_layers == 1


def test_quantize_model_from_gguf(gguf_model, tmp_path):
    pytest.importorskip("torchao")
    from hf_compress import quantize_model

    model, path = gguf_model
    quantized = quantize_model(str(path), "torchao-int8", output_dir=tmp_path / "q")
    reference = quantize_model(model, "torchao-int8")
    torch.testing.assert_close(_logits(quantized, IDS), _logits(reference, IDS))


def test_compression_report_and_cli_read_gguf(gguf_model, tmp_path, capsys):
    from hf_compress import compression_report
    from hf_compress.cli import main

    model, path = gguf_model
    report = compression_report({"gguf": str(path), "module": model}, latency_batches=0)
    assert report.rows[0].parameters == report.rows[1].parameters
    assert report.rows[0].disk_bytes == path.stat().st_size  # the GGUF file's own bytes
    assert main(["report", str(path), "--latency_batches", "0"]) == 0
    assert "tiny.gguf" in capsys.readouterr().out


def test_load_qlora_model_from_gguf(gguf_model, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from hf_compress import load_qlora_model

    monkeypatch.setenv("HF_COMPRESS_CACHE", str(tmp_path))
    _, path = gguf_model
    model = load_qlora_model(str(path), load_in_4bit=False, lora_r=2, device_map={"": "cpu"})
    assert any("lora_A" in n for n, _ in model.named_parameters())
