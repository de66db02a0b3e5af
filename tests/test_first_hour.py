"""A new user's first hour (issue 18): names HF users know, outputs ready for the Hub, errors before training."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny_models import classification_dataset, lm_dataset, save_tiny_url_teacher, tiny_bert, tiny_llama
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hf_compress import (
    CompressionReportCallback,
    DistillationConfig,
    DistillationTrainer,
    PostTrainingQuantizationCallback,
    PruningCallback,
    PruningConfig,
    QATCallback,
    QATConfig,
    StructuredPruningConfig,
    compression_report,
    create_student,
    load_recipe,
    make_compute_metrics,
    normalize_task,
    quantize_model,
    run_recipe,
    sparsity_report,
)
from hf_compress.errors import RecipeError, UnavailableError

ROOT = Path(__file__).resolve().parent.parent


def _args(tmp_path, cls=TrainingArguments, **kw):
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
        logging_steps=1,
    )
    defaults.update(kw)
    return cls(**defaults)


def _accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


# ---------------------------------------------------------------------------------------------------------------
# quiet import


def _stderr_of(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("HF_COMPRESS_SHOW_BACKEND_WARNINGS", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_import_and_cli_start_print_nothing_on_stderr():
    # every backend the library imports lazily, imported the way a user's script does after `import hf_compress`
    code = (
        "import hf_compress\n"
        "from hf_compress import PruningConfig, QATCallback, quantize_model, DistillationTrainer, load_qlora_model\n"
        "import torchao, bitsandbytes, bitsandbytes.backends.cpu.ops, peft\n"
        "from hf_compress.cli import build_parser\n"
        "build_parser().format_help()\n"
    )
    assert _stderr_of(code) == ""


def test_backend_filters_are_narrow():
    # an unrelated warning of the same loggers still shows; the env switch shows the dropped ones again
    code = (
        "import logging, hf_compress\n"
        "logging.getLogger('torchao').warning('something else')\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU gemm_4bit_forward: bad')\n"
    )
    stderr = _stderr_of(code)
    assert "something else" in stderr and "gemm_4bit_forward: bad" in stderr


# ---------------------------------------------------------------------------------------------------------------
# task names


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("text-classification", "sequence-classification"),
        ("SEQ_CLS", "sequence-classification"),
        ("classification", "sequence-classification"),
        ("sequence-classification", "sequence-classification"),
        ("CAUSAL_LM", "causal-lm"),
        ("text-generation", "causal-lm"),
        ("causal_lm", "causal-lm"),
        ("TOKEN_CLS", "token-classification"),
        ("token-classification", "token-classification"),
        ("ner", "token-classification"),
    ],
)
def test_task_spellings_mean_one_task(spelling, canonical):
    assert normalize_task(spelling) == canonical
    assert DistillationConfig(output_dir="o", task=spelling).task == canonical


def test_task_enum_and_errors_everywhere():
    from peft import TaskType

    assert DistillationConfig(output_dir="o", task=TaskType.SEQ_CLS).task == "sequence-classification"
    assert normalize_task(TaskType.CAUSAL_LM) == "causal-lm"
    assert DistillationConfig(output_dir="o").task == "auto"
    with pytest.raises(ValueError, match=r"task='text-clasification'.*Did you mean 'sequence-classification'"):
        DistillationConfig(output_dir="o", task="text-clasification")
    with pytest.raises(ValueError, match="'summarization' means 'seq2seq-lm', which is not supported here"):
        DistillationConfig(output_dir="o", task="summarization")
    # the same vocabulary in metrics, reports and QLoRA
    metrics = make_compute_metrics("TOKEN_CLS")
    logits = np.array([[[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]])
    assert metrics(types.SimpleNamespace(predictions=logits, label_ids=np.array([[1, 0, -100]])))["accuracy"] == 1.0
    report = compression_report({"m": tiny_bert()}, task="text-classification")
    assert report.task == "sequence-classification"
    from hf_compress import prepare_qlora

    peft_model = prepare_qlora(tiny_bert(hidden=32), task="SEQ_CLS", lora_r=2, gradient_checkpointing=False)
    assert str(peft_model.peft_config["default"].task_type.value) == "SEQ_CLS"


# ---------------------------------------------------------------------------------------------------------------
# HfArgumentParser


@pytest.mark.parametrize(
    ("cls", "argv", "expected"),
    [
        (
            DistillationConfig,
            ["--output_dir", "o", "--temperature", "3", "--task", "CAUSAL_LM"],
            {"task": "causal-lm"},
        ),
        (
            PruningConfig,
            ["--sparsity", "0.3", "--target_modules", "q_proj", "v_proj", "--schedule", "cubic", "--end_step", "9"],
            {"sparsity": 0.3, "target_modules": ["q_proj", "v_proj"], "end_step": 9},
        ),
        (QATConfig, ["--group_size", "16", "--exclude_modules", "lm_head"], {"group_size": 16}),
        (StructuredPruningConfig, ["--ffn_pruning_ratio", "0.5"], {"ffn_pruning_ratio": 0.5}),
    ],
)
def test_every_config_parses_with_hfargumentparser(cls, argv, expected):
    (config,) = HfArgumentParser(cls).parse_args_into_dataclasses(argv)
    assert isinstance(config, cls)
    for key, value in expected.items():
        assert getattr(config, key) == value
    (default,) = HfArgumentParser(cls).parse_args_into_dataclasses(
        ["--output_dir", "o"] if cls is DistillationConfig else []
    )
    assert isinstance(default, cls)


def test_demo_config_parses_with_hfargumentparser():
    from hf_compress.demo import DemoConfig

    (config,) = HfArgumentParser(DemoConfig).parse_args_into_dataclasses(["--num_threads", "1", "--sparsity", "0.4"])
    assert config.num_threads == 1 and config.sparsity == 0.4


# ---------------------------------------------------------------------------------------------------------------
# threads


def test_thread_choice_and_log(monkeypatch, caplog):
    from hf_compress.utils.threads import choose_num_threads, configure_threads

    assert choose_num_threads(cores=2, load=0.0, default=2) == 1  # small machine
    assert choose_num_threads(cores=16, load=16.0, default=16) == 1  # busy machine
    assert choose_num_threads(cores=16, load=3.2, default=16) == 12  # the idle cores
    assert choose_num_threads(cores=16, load=0.0, default=8) == 8  # never more than torch's choice
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING):
            assert configure_threads(1) == 1 == torch.get_num_threads()
        assert "using 1 CPU thread for torch (as asked)" in caplog.text
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            configure_threads()
        assert "OMP_NUM_THREADS=1" in caplog.text
        with pytest.raises(ValueError, match="num_threads=0"):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------
# logs


def test_log_names_are_distinct_and_documented(tmp_path):
    readme = (ROOT / "README.md").read_text()
    teacher, student = tiny_bert(hidden=32, layers=2), tiny_bert(hidden=32, layers=1, seed=1)
    args = _args(
        tmp_path, DistillationConfig, alpha=1.0, eval_strategy="steps", eval_steps=3, max_steps=3, logging_steps=3
    )
    callbacks = [PruningCallback(PruningConfig(sparsity=0.5)), CompressionReportCallback()]
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=classification_dataset(n=24),
        eval_dataset=classification_dataset(n=16, seed=1),
        callbacks=callbacks,
    )
    trainer.train()
    train_logs = next(h for h in trainer.state.log_history if "loss" in h)
    eval_logs = next(h for h in trainer.state.log_history if "eval_loss" in h)
    assert train_logs["sparsity_targeted"] == pytest.approx(0.5, abs=0.01)
    assert train_logs["sparsity_scheduled"] == 0.5 and "sparsity" not in train_logs
    assert 0 < eval_logs["eval_sparsity_model"] < train_logs["sparsity_targeted"]  # embeddings are not pruned
    assert eval_logs["eval_loss_task"] > 0 and eval_logs["eval_loss_task"] != eval_logs["eval_loss"]  # alpha=1
    for name in ("sparsity_targeted", "sparsity_scheduled", "eval_sparsity_model", "eval_loss_task", "qat_enabled"):
        assert f"`{name}`" in readme, name


def test_qat_logs_its_state(tmp_path):
    pytest.importorskip("torchao")
    qat = QATCallback(scheme="int8-dynamic-activation-int4-weight", group_size=16, start_step=2, save_quantized=False)
    trainer = Trainer(
        model=tiny_llama(), args=_args(tmp_path, max_steps=4), train_dataset=lm_dataset(32), callbacks=[qat]
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["qat_enabled"] for h in logs] == [0, 1, 1, 1]
    assert logs[-1]["qat_layers"] == 14 and logs[0]["qat_layers"] == 0
    assert (logs[-1]["qat_weight_bits"], logs[-1]["qat_activation_bits"], logs[-1]["qat_group_size"]) == (4, 8, 16)


def test_sparsity_report_prints_a_summary():
    from hf_compress import prune_

    model = tiny_llama()
    prune_(model, PruningConfig(pattern="2:4"))
    report = sparsity_report(model, pattern="2:4")
    text = repr(report)
    assert text.startswith("SparsityReport: ") and "targeted layers: 50.0%" in text and "N:M compliant: yes" in text
    assert len(text.splitlines()) == 2 and str(report) == text
    assert report["target_sparsity"] == pytest.approx(0.5) and isinstance(report, dict)
    table = report.to_markdown()
    assert "| model.layers.0.self_attn.q_proj | 1,024 | 512 | 50.0% | yes |" in table


# ---------------------------------------------------------------------------------------------------------------
# post-training quantization callback


def test_ptq_callback_in_the_readme_form_logs_metrics(tmp_path):
    pytest.importorskip("bitsandbytes")
    trainer = Trainer(
        model=tiny_bert(hidden=64),
        args=_args(tmp_path),  # eval_strategy "no", no trainer= given
        train_dataset=classification_dataset(n=48),
        eval_dataset=classification_dataset(n=32, seed=1),
        compute_metrics=_accuracy,
        callbacks=[PostTrainingQuantizationCallback(method="nf4")],
    )
    trainer.train()
    (logs,) = [h for h in trainer.state.log_history if "ptq_nf4_accuracy" in h]
    assert 0 <= logs["ptq_nf4_accuracy"] <= 1 and 0 <= logs["eval_accuracy"] <= 1
    assert logs["eval_accuracy"] == pytest.approx(trainer.evaluate()["eval_accuracy"])
    assert logs["ptq_nf4_disk_bytes"] < logs["full_precision_disk_bytes"]


def test_ptq_callback_with_a_peft_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_bert(hidden=64), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=classification_dataset(n=48),
        eval_dataset=classification_dataset(n=32, seed=1),
        compute_metrics=_accuracy,
        callbacks=[PostTrainingQuantizationCallback("nf4")],
    )
    trainer.train()
    (logs,) = [h for h in trainer.state.log_history if "ptq_nf4_accuracy" in h]
    assert np.isfinite(logs["ptq_nf4_loss"])
    from transformers import BertForSequenceClassification

    merged = BertForSequenceClassification.from_pretrained(tmp_path / "run" / "ptq_nf4", device_map="cpu")
    assert type(merged.bert.encoder.layer[0].attention.self.query).__name__ == "Linear4bit"
    assert (tmp_path / "run" / "adapter_config.json").is_file()  # the trained adapter, saved as save_model would
    assert not any("lora" in n for n, _ in merged.named_parameters())  # the adapters were merged into the copy


def test_ptq_callback_with_a_4bit_peft_model_fails_before_training(tmp_path):
    pytest.importorskip("bitsandbytes")
    from hf_compress import load_qlora_model

    tiny_bert(hidden=64).save_pretrained(tmp_path / "base")
    model = load_qlora_model(str(tmp_path / "base"), task="text-classification", lora_r=2)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=classification_dataset(n=16),
        eval_dataset=classification_dataset(n=16, seed=1),
        callbacks=[PostTrainingQuantizationCallback("nf4")],
    )
    with pytest.raises(ValueError, match="quantized \\(k-bit\\) base cannot be quantized again.*merge_qlora"):
        trainer.train()
    assert trainer.state.global_step == 0


# ---------------------------------------------------------------------------------------------------------------
# chaining: distillation -> saved model -> quantize_model; clear errors for folders without a model


def test_distillation_chains_into_quantize_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    teacher = tiny_bert(hidden=64)
    student = create_student(teacher, num_layers=1)
    args = _args(tmp_path, DistillationConfig, save_strategy="steps", save_steps=2, max_steps=3)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=classification_dataset(n=32)
    )
    trainer.train()
    with pytest.raises(
        FileNotFoundError, match=r"holds Trainer checkpoints \(checkpoint-2, checkpoint-3\).*save_model"
    ):
        quantize_model(args.output_dir, "nf4")
    trainer.save_model()
    quantized = quantize_model(args.output_dir, "nf4")
    assert type(quantized.bert.encoder.layer[0].output.dense).__name__ == "Linear4bit"


def test_missing_model_folders_fail_fast(tmp_path, monkeypatch):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        quantize_model(str(tmp_path / "student"), "nf4")
    with pytest.raises(FileNotFoundError, match="no saved model at"):
        compression_report({"x": "./does/not/exist"})
    # a name that could be on the Hub: looked up once (here offline: not in the cache), not retried for a minute
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(UnavailableError, match="not in the local cache"):
        quantize_model("student", "nf4")
    assert time.perf_counter() - start < 20


# ---------------------------------------------------------------------------------------------------------------
# model cards after push_to_hub


@pytest.fixture
def fake_hub(monkeypatch):
    """`Trainer.push_to_hub` with the upload replaced: records the README.md that would have been uploaded."""
    import transformers.trainer

    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return types.SimpleNamespace(repo_id="user/" + str(repo_id).split("/")[-1])

        def upload_folder(self, folder_path, **kwargs):
            uploads.append({"readme": (Path(folder_path) / "README.md").read_text(), "files": os.listdir(folder_path)})
            return "https://huggingface.co/user/model"

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda *a, **k: FakeApi())
    return uploads


def _card_header(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_distillation_card_survives_push_to_hub(tmp_path, fake_hub):
    from hf_compress.reporting import MODEL_CARD_BEGIN

    teacher = tiny_bert(hidden=32)
    teacher.config._name_or_path = "google-bert/bert-base-uncased"  # as if loaded from the Hub
    student = create_student(teacher, num_layers=1)
    args = _args(tmp_path, DistillationConfig, temperature=3.0, alpha=0.7, loss_type="reverse_kl")
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=classification_dataset(n=16),
        callbacks=[CompressionReportCallback(), PruningCallback(PruningConfig(sparsity=0.5))],
    )
    trainer.train()
    section_before = (Path(args.output_dir) / "README.md").read_text().split(MODEL_CARD_BEGIN)[1]
    trainer.push_to_hub()
    readme = fake_hub[-1]["readme"]
    header = _card_header(readme)
    assert header["library_name"] == "transformers"
    assert header["base_model"] == "google-bert/bert-base-uncased"
    assert {"hf_compress", "model-compression", "knowledge-distillation", "pruning"} <= set(header["tags"])
    assert MODEL_CARD_BEGIN + section_before.split("<!-- hf_compress:end -->")[0] in readme  # kept as written
    for line in ("- temperature: 3", "- alpha: 0.7", "- loss_type: reverse_kl", "- pruning_sparsity: 0.5"):
        assert line in readme, line
    assert "### Training hyperparameters" in readme  # the Trainer's own card is still there


def test_plain_trainer_card_survives_push_to_hub(tmp_path, fake_hub):
    pytest.importorskip("torchao")
    from hf_compress.reporting import MODEL_CARD_BEGIN

    trainer = Trainer(
        model=tiny_llama(),
        args=_args(tmp_path, max_steps=2),
        train_dataset=lm_dataset(16),
        callbacks=[CompressionReportCallback(), QATCallback(group_size=16, save_quantized=False)],
    )
    trainer.train()
    trainer.push_to_hub()
    readme = fake_hub[-1]["readme"]
    assert MODEL_CARD_BEGIN in readme and "- quantization-aware training: scheme=int8-dynamic" in readme
    assert "- qat_scheme: int8-dynamic-activation-int4-weight" in readme
    assert {"hf_compress", "quantization"} <= set(_card_header(readme)["tags"])


# ---------------------------------------------------------------------------------------------------------------
# QAT exports in reports; recipes


def test_report_of_a_qat_export(tmp_path):
    pytest.importorskip("torchao")
    from hf_compress import prepare_qat_, save_qat_model

    model = tiny_llama(hidden=64)
    config = QATConfig(group_size=32)
    prepare_qat_(model, config)
    save_qat_model(model, tmp_path / "int4", config)
    report = compression_report({"int4": tmp_path / "int4"}, eval_dataset=lm_dataset(8).rows, batch_size=4)
    row = report["int4"]
    assert 0.5 * row.parameters < row.nonzero_parameters <= row.parameters  # counted, not a crash
    assert np.isfinite(row.metrics["perplexity"]) and row.latency_device.startswith("cpu (")
    out = subprocess.run(
        [sys.executable, "-m", "hf_compress.cli", "report", str(tmp_path / "int4"), "--num_threads", "1"],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| int4 |" in out.stdout and "using 1 CPU thread for torch (as asked)" in out.stderr


def test_report_with_string_labels(tmp_path):
    from datasets import Dataset

    model, tokenizer = save_tiny_url_teacher(tmp_path / "m", layers=1)
    model.config.label2id, model.config.id2label = {"legitimate": 0, "phishing": 1}, {0: "legitimate", 1: "phishing"}
    data = Dataset.from_dict(
        {"text": ["http://a.com/login", "http://paypal.example/verify"] * 4, "label": ["legitimate", "Phishing"] * 4}
    )
    report = compression_report({"m": model}, eval_dataset=data, processing_class=tokenizer, batch_size=4)
    assert set(report["m"].metrics) >= {"accuracy", "f1"}
    with pytest.raises(ValueError, match=r"string labels \['spam'\] are not in the model's label2id"):
        compression_report(
            {"m": model}, eval_dataset=data.map(lambda r: {"label": "spam"}), processing_class=tokenizer
        )


@pytest.fixture(scope="module")
def url_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("url_teacher")
    save_tiny_url_teacher(folder, layers=2)
    return folder


def _recipe(model, output_dir, stages, **kw):
    return {
        "model": str(model),
        "output_dir": str(output_dir),
        "dataset": {"name": "phishing", "max_examples": 96, "max_length": 32},
        "report": {"batch_size": 16, "latency_batches": 1, "warmup": 0},
        "stages": stages,
        **kw,
    }


@pytest.mark.parametrize("relative", [False, True], ids=["absolute-output_dir", "relative-output_dir"])
def test_prune_then_qat_recipe_runs_to_the_end(url_teacher, tmp_path, monkeypatch, relative):
    """`examples/recipes/prune_qat.yaml` as written has a relative output_dir: the QAT stage's quantized model used to
    land in <stage>/<output_dir>/<stage>/quantized and the run failed at its report after both stages trained."""
    pytest.importorskip("torchao")
    monkeypatch.chdir(tmp_path)
    stages = [
        {"type": "prune", "config": {"sparsity": 0.5}, "args": {"max_steps": 2, "per_device_train_batch_size": 8}},
        {
            "type": "qat",
            "config": {"scheme": "int8-dynamic-activation-int4-weight", "group_size": 16, "start_step": 1},
            "args": {"max_steps": 2, "per_device_train_batch_size": 8},
        },
    ]
    report = run_recipe(_recipe(url_teacher, "out" if relative else tmp_path / "out", stages))
    assert [r.name for r in report.rows] == ["input", "prune", "qat"]
    assert report["qat"].disk_bytes < report["prune"].disk_bytes
    assert (tmp_path / "out" / "2_qat" / "quantized" / "config.json").is_file()


@pytest.mark.parametrize(
    ("qat_config", "qat_args", "message"),
    [
        ({"start_step": -1}, {"max_steps": 4}, r"start_step=-1 must be an integer >= 0"),
        ({"start_step": 4}, {"max_steps": 4}, r"config.start_step=4 is not allowed: the stage trains 4"),
        # epoch-based: checked once the data is loaded, still before the first stage
        ({"start_step": 500}, {"num_train_epochs": 1, "per_device_train_batch_size": 8}, r"the stage trains \d+ "),
    ],
)
def test_qat_start_step_is_checked_before_any_stage_trains(url_teacher, tmp_path, qat_config, qat_args, message):
    pytest.importorskip("torchao")
    stages = [
        {"type": "distill", "student": {"num_layers": 1}, "args": {"max_steps": 1, "per_device_train_batch_size": 8}},
        {"type": "qat", "config": qat_config, "args": qat_args, "distill_from_teacher": True},
    ]
    with pytest.raises(RecipeError, match=message):
        run_recipe(_recipe(url_teacher, tmp_path / "out", stages))
    assert not (tmp_path / "out" / "1_distill" / "model.safetensors").exists()  # the distill stage never trained


def test_recipe_dataset_fields_and_syntax_errors_are_named(url_teacher, tmp_path):
    stages = [{"type": "quantize", "config": {"method": "torchao-int8"}}]
    with pytest.raises(RecipeError, match=r"dataset.text_column=5 is not allowed: it must be a column name"):
        load_recipe(_recipe(url_teacher, tmp_path / "o", stages, dataset={"hub": "x/y", "text_column": 5}))
    with pytest.raises(RecipeError, match=r"dataset.text_column / label_column apply to 'hub' datasets"):
        load_recipe(_recipe(url_teacher, tmp_path / "o", stages, dataset={"name": "phishing", "text_column": "url"}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nstages:\n  - type: quantize\n   config: {}\n")
    with pytest.raises(RecipeError, match=rf"{bad}.* is not valid YAML(.|\n)*line 4"):
        load_recipe(bad)
    (tmp_path / "bad.json").write_text('{"model": "m",}')
    with pytest.raises(RecipeError, match="is not valid JSON: .* line 1"):
        load_recipe(tmp_path / "bad.json")


def test_recipe_paths_are_relative_to_the_recipe_file(url_teacher, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "project" / "recipes"
    folder.mkdir(parents=True)
    shutil.copytree(url_teacher, tmp_path / "project" / "teacher")
    recipe_file = folder / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe("../teacher", "out", [{"type": "quantize"}])))
    monkeypatch.chdir(tmp_path)  # somewhere else entirely
    recipe = load_recipe(recipe_file)
    assert Path(recipe.model) == tmp_path / "project" / "teacher" and recipe.output_dir == "out"
    recipe_file.write_text(yaml.safe_dump(_recipe("../missing_teacher", "out", [{"type": "quantize"}])))
    start = time.perf_counter()
    with pytest.raises(RecipeError, match=r"no model folder at .*missing_teacher.*resolved against .*recipes"):
        load_recipe(recipe_file)
    assert time.perf_counter() - start < 5
    # a run: the same message from the command line, exit status 2 and no traceback
    from hf_compress.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(recipe_file), "--num_threads", str(torch.get_num_threads())])
    assert exit_info.value.code == 2


def test_shipped_recipes_validate(tmp_path, monkeypatch):
    """The shipped recipes load (paths relative to their folder) once the demo's folders exist in the repo root."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "examples" / "recipes", repo / "examples" / "recipes")
    for name in ("1_teacher", "2_student"):
        tiny_bert().save_pretrained(repo / "hf_compress_demo" / name)
    monkeypatch.chdir(repo)
    for name in ("distill_prune_quantize.yaml", "prune_qat.yaml"):  # smollm2_pipeline.yaml asks for bf16: a GPU
        recipe_file = repo / "examples" / "recipes" / name
        recipe = load_recipe(recipe_file)
        assert Path(recipe.model).is_relative_to(repo / "hf_compress_demo"), recipe_file.name
        assert json.loads(json.dumps(recipe.dataset))  # plain data
