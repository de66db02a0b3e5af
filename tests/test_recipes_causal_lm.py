"""A causal-LM recipe (task: causal-lm, text_dir dataset, perplexity) on a tiny Llama given as a GGUF file."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("gguf")
pytest.importorskip("torchao")

from tiny_gguf import tiny_llama_for_gguf, write_llama_gguf  # noqa: E402

from hf_compress import load_recipe, run_recipe  # noqa: E402
from hf_compress.recipes import RecipeError  # noqa: E402


def _text(n, seed):
    rng = random.Random(seed)
    return " ".join("".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6))) for _ in range(n))


def test_causal_lm_recipe_from_gguf(tmp_path):
    gguf = write_llama_gguf(tiny_llama_for_gguf(), tmp_path / "tiny.gguf")
    data = tmp_path / "text"
    data.mkdir()
    (data / "train.txt").write_text(_text(600, 0))
    (data / "test.txt").write_text(_text(200, 1))
    recipe = {
        "task": "causal-lm",
        "model": str(gguf),
        "output_dir": str(tmp_path / "out"),
        "dataset": {"text_dir": str(data), "block_size": 32, "max_eval_tokens": 256, "calibration_batches": 2},
        "report": {"batch_size": 4, "latency_batches": 1, "warmup": 0},
        "stages": [
            {"type": "prune", "config": {"method": "wanda", "sparsity": 0.5, "num_calibration_batches": 2}},
            {"type": "quantize", "config": {"method": "int4-packed", "group_size": 32}, "storage_dtype": "bfloat16"},
        ],
    }
    report = run_recipe(recipe)
    assert [r.name for r in report.rows] == ["input", "prune", "quantize"]
    assert all(r.metrics["perplexity"] > 1 for r in report.rows)
    assert report["prune"].nonzero_parameters < report["input"].nonzero_parameters
    assert report["quantize"].disk_bytes < report["input"].disk_bytes / 4
    assert report["quantize"].parameters == report["input"].parameters  # packed weights are counted


def test_causal_lm_recipe_needs_text_dir(tmp_path):
    with pytest.raises(RecipeError, match="text_dir"):
        load_recipe({"task": "causal-lm", "model": "m", "output_dir": str(tmp_path), "stages": [{"type": "quantize"}]})
    with pytest.raises(RecipeError, match="task"):
        load_recipe({"task": "lm", "model": "m", "output_dir": str(tmp_path), "stages": [{"type": "quantize"}]})
