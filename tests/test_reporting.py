"""compression_report figures against hand-computed ones, the report's renderings, and CompressionReportCallback."""

import json

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, classification_dataset, tiny_bert
from transformers import Trainer, TrainingArguments

from hf_compress import CompressionReport, CompressionReportCallback, compression_report
from hf_compress.reporting import MODEL_CARD_BEGIN, ReportRow, size_figures


def bert_parameter_count(vocab, hidden, layers, intermediate, positions, labels, type_vocab=2):
    """BERT-for-classification parameters, written out from the architecture."""
    embeddings = vocab * hidden + positions * hidden + type_vocab * hidden + 2 * hidden  # + LayerNorm
    attention = 4 * (hidden * hidden + hidden) + 2 * hidden  # q, k, v, output dense + LayerNorm
    ffn = (hidden * intermediate + intermediate) + (intermediate * hidden + hidden) + 2 * hidden
    pooler = hidden * hidden + hidden
    classifier = hidden * labels + labels
    return embeddings + layers * (attention + ffn) + pooler + classifier


def test_size_figures_match_hand_computed(tmp_path):
    model = tiny_bert(layers=2, hidden=32, heads=4)
    expected_params = bert_parameter_count(VOCAB, 32, 2, 64, 64, 2)
    nonzero_before = sum(int((p != 0).sum()) for p in model.parameters())
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    with torch.no_grad():
        flat = weight.view(-1)
        nonzero_idx = torch.nonzero(flat).flatten()[:100]
        flat[nonzero_idx] = 0.0  # 100 weights that were not zero
    model.save_pretrained(tmp_path / "saved")
    file_bytes = (tmp_path / "saved" / "model.safetensors").stat().st_size

    report = compression_report({"module": model, "path": tmp_path / "saved"})
    for row in report.rows:
        assert row.parameters == expected_params
        assert row.nonzero_parameters == nonzero_before - 100
        assert row.disk_bytes == file_bytes
        assert row.bits_per_parameter == pytest.approx(file_bytes * 8 / expected_params)
        assert row.sparsity == pytest.approx(1 - (nonzero_before - 100) / expected_params)
        assert row.latency_ms is None and row.metrics == {}  # no eval data: size figures only
    # fp32 weights plus the safetensors JSON header (a few kB, large next to this tiny model)
    assert 32 < report.rows[0].bits_per_parameter < 34
    # memory: every parameter and buffer (position ids, token type ids) in bytes
    expected_memory = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert report.rows[0].memory_bytes == expected_memory
    # the cheap in-training estimate agrees with the file to within the header
    assert 0 <= file_bytes - size_figures(model)["size_mb"] * 1e6 < 20_000


def test_report_metrics_latency_and_renderings(tmp_path):
    teacher = tiny_bert(layers=2, seed=0).eval()
    student = tiny_bert(layers=1, seed=1).eval()
    data = classification_dataset(n=40)
    report = compression_report(
        {"teacher": teacher, "student": student}, eval_dataset=data, batch_size=16, latency_batches=3, warmup=1
    )
    # metrics equal an argmax computed here
    with torch.no_grad():
        ids = torch.stack([r["input_ids"] for r in data.rows])
        labels = np.array([r["labels"] for r in data.rows])
        for name, model in (("teacher", teacher), ("student", student)):
            preds = model(input_ids=ids).logits.argmax(-1).numpy()
            assert report[name].metrics["accuracy"] == pytest.approx(float((preds == labels).mean()))
            assert set(report[name].metrics) == {"accuracy", "precision", "recall", "f1"}
            assert report[name].latency_ms > 0
    ratios = report.ratios()
    assert ratios[0]["size_ratio"] == 1.0
    assert ratios[1]["size_ratio"] == pytest.approx(report["teacher"].disk_bytes / report["student"].disk_bytes)
    assert ratios[1]["size_ratio"] > 1.2  # one layer fewer

    table = report.to_markdown()
    lines = table.splitlines()
    assert len(lines) == 4 and "x smaller" in lines[0] and "accuracy" in lines[0]
    assert lines[3].startswith("| student |") and f"{ratios[1]['size_ratio']:.1f}x" in lines[3]

    data_json = json.loads(report.to_json(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text()) == data_json
    assert [r["name"] for r in data_json["rows"]] == ["teacher", "student"]
    assert data_json["rows"][1]["parameters"] == report["student"].parameters

    png = report.plot(tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_report_of_4bit_model_counts_logical_parameters(tmp_path):
    pytest.importorskip("bitsandbytes")
    from hf_compress import quantize_model

    model = tiny_bert(layers=2, hidden=64, heads=4).eval()
    quantize_model(model, "nf4", output_dir=tmp_path / "nf4")
    report = compression_report({"fp32": model, "nf4": tmp_path / "nf4"})
    fp32, nf4 = report["fp32"], report["nf4"]
    assert nf4.parameters == fp32.parameters  # 4-bit weights counted once each, not per packed byte
    files = sorted((tmp_path / "nf4").glob("*.safetensors"))
    assert nf4.disk_bytes == sum(f.stat().st_size for f in files)
    assert nf4.bits_per_parameter < fp32.bits_per_parameter / 1.5


def test_report_bad_arguments():
    with pytest.raises(ValueError, match="at least one model"):
        compression_report({})
    with pytest.raises(ValueError, match="task="):
        compression_report({"m": tiny_bert()}, task="detection")
    with pytest.raises(ValueError, match="batch_size"):
        compression_report({"m": tiny_bert()}, batch_size=0)
    with pytest.raises(FileNotFoundError, match="no saved model"):
        compression_report({"m": "/nonexistent/model"})
    with pytest.raises(ValueError, match="at least one row"):
        CompressionReport(rows=[])


def test_ratio_columns_from_rows():
    report = CompressionReport([ReportRow("a", 1000, 1000, 4000, 4000, 10.0), ReportRow("b", 500, 250, 400, 400, 5.0)])
    ratios = report.ratios()[1]
    assert ratios == {"size_ratio": 10.0, "parameter_ratio": 2.0, "speedup": 2.0}
    assert report["b"].sparsity == 0.5 and report["b"].bits_per_parameter == pytest.approx(6.4)


def test_callback_logs_figures_and_writes_model_card(tmp_path):
    model = tiny_bert(layers=1)
    params = sum(p.numel() for p in model.parameters())
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=8,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    data = classification_dataset(n=16)
    callback = CompressionReportCallback(
        methods=["distillation (T=2)", "pruning 50%"], reference={"name": "t", "size_mb": 1.0}
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[callback])
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_parameters"] == params
    assert metrics["eval_bits_per_parameter"] == pytest.approx(32, rel=0.01)
    eval_logs = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert eval_logs and all(e["eval_parameters"] == params for e in eval_logs)

    checkpoint_card = (tmp_path / "out" / "checkpoint-2" / "README.md").read_text()
    assert MODEL_CARD_BEGIN in checkpoint_card and "- pruning 50%" in checkpoint_card
    assert f"| parameters | {params:,} |" in checkpoint_card
    final_card = tmp_path / "out" / "README.md"
    assert "- distillation (T=2)" in final_card.read_text()
    # a second write replaces the section instead of appending another one
    callback.on_train_end(args, trainer.state, trainer.control, model=model)
    assert final_card.read_text().count(MODEL_CARD_BEGIN) == 1


def test_report_loads_every_saved_model_on_one_device(tmp_path, monkeypatch):
    """With a GPU present, float and quantized checkpoints given as paths load on the same device (a float model on
    the CPU next to a quantized one on the GPU made the SmolLM2 pipeline report's latencies 40x apart)."""
    import hf_compress.reporting.measure as measure

    for name, seed in (("a", 0), ("b", 1)):
        tiny_bert(layers=1, seed=seed).save_pretrained(tmp_path / name)
    seen = []
    real_load = measure.load_model

    def recording_load(path, device=None):
        seen.append(device)
        return real_load(path, device=None)  # this machine has no GPU: load on the CPU, record what was asked

    monkeypatch.setattr(measure, "load_model", recording_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    compression_report({"a": tmp_path / "a", "b": tmp_path / "b"}, latency_batches=0)
    assert seen == ["cuda:0", "cuda:0"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen.clear()
    compression_report({"a": tmp_path / "a"}, device="cpu", latency_batches=0)
    assert seen == ["cpu"]
