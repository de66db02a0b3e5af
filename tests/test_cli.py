"""The hf-compress command line: --help of every subcommand, a tiny `run` end to end, `report`, and demo errors."""

import dataclasses
import json
import subprocess
import sys

import pytest
import yaml
from tiny_models import save_tiny_url_teacher

from hf_compress.cli import main
from hf_compress.demo import DemoConfig
from hf_compress.pruning import PruningConfig


def _help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_documents_subcommands_and_every_field(capsys):
    top = _help(["--help"], capsys)
    for command in ("run", "report", "demo"):
        assert command in top
    demo = _help(["demo", "--help"], capsys)
    for f in dataclasses.fields(DemoConfig):
        assert f"--{f.name}" in demo, f.name
    assert "Hidden size of the teacher" in demo
    run = _help(["run", "--help"], capsys)
    for f in dataclasses.fields(PruningConfig):
        assert f"{f.name} (default" in run, f.name
    assert "temperature (default 2.0)" in run and "ffn_pruning_ratio" in run
    report = _help(["report", "--help"], capsys)
    assert "--latency_batches" in report and "--plot" in report


def test_console_script_help():
    result = subprocess.run(
        [sys.executable, "-c", "from hf_compress.cli import main; main()", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "{run,report,demo}" in result.stdout


def test_run_and_report_end_to_end(tmp_path, capsys):
    save_tiny_url_teacher(tmp_path / "teacher", layers=2)
    recipe = {
        "model": str(tmp_path / "teacher"),
        "output_dir": str(tmp_path / "ignored"),
        "dataset": {"name": "phishing", "max_examples": 64, "max_length": 32},
        "report": {"batch_size": 16, "latency_batches": 1, "warmup": 0},
        "stages": [
            {"type": "distill", "student": {"num_layers": 1, "num_heads": 2}, "args": {"max_steps": 1}},
            {"type": "structured_prune", "config": {"ffn_pruning_ratio": 0.5}},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["run", str(path), "--output-dir", str(out), "--json", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    assert "| input |" in table and "| distill |" in table and "| structured_prune |" in table
    assert (out / "1_distill" / "model.safetensors").is_file()
    assert (out / "2_structured_prune" / "model.safetensors").is_file()
    assert not (tmp_path / "ignored").exists()  # --output-dir replaced the recipe's
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    pruned_cfg = json.loads((out / "2_structured_prune" / "config.json").read_text())
    assert pruned_cfg["intermediate_size"] == 32 and pruned_cfg["num_hidden_layers"] == 1
    assert rows[2]["parameters"] < rows[1]["parameters"] < rows[0]["parameters"]

    # without --overwrite the existing stage folders are kept
    assert "overwrite" in _error(["run", str(path), "--output-dir", str(out)], capsys)
    assert main(["run", str(path), "--output-dir", str(out), "--overwrite"]) == 0
    capsys.readouterr()

    # report on saved folders, with evaluation on the embedded test split
    plot = tmp_path / "cmp.png"
    args = ["report", str(tmp_path / "teacher"), str(out / "2_structured_prune"), "--names", "teacher", "pruned"]
    assert (
        main(
            args + ["--dataset", "phishing", "--max_eval_batches", "2", "--latency_batches", "1", "--plot", str(plot)]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| teacher |" in table and "| pruned |" in table and "accuracy" in table
    assert plot.read_bytes()[:4] == b"\x89PNG"


def _error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_demo_with_hub_names_fails_clearly_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _error(
        ["demo", "--output_dir", str(tmp_path / "d"), "--dataset", "shawhin/phishing-site-classification"], capsys
    )
    assert "could not be loaded from the Hugging Face Hub" in err and "leave out --dataset" in err
    err = _error(["demo", "--output_dir", str(tmp_path / "e"), "--teacher", "google-bert/bert-base-uncased"], capsys)
    assert "teacher='google-bert/bert-base-uncased' could not be loaded" in err and "leave out --teacher" in err


def test_demo_refuses_existing_output_and_bad_values(tmp_path, capsys):
    (tmp_path / "d" / "1_teacher").mkdir(parents=True)
    (tmp_path / "d" / "1_teacher" / "model.safetensors").write_bytes(b"x")
    assert "--overwrite" in _error(["demo", "--output_dir", str(tmp_path / "d")], capsys)
    assert (tmp_path / "d" / "1_teacher" / "model.safetensors").read_bytes() == b"x"
    with pytest.raises(ValueError, match="ffn_pruning_ratio"):
        main(["demo", "--output_dir", str(tmp_path / "e"), "--ffn_pruning_ratio", "1.5"])
    assert not (tmp_path / "e").exists()
