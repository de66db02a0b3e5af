"""`hf-compress demo` is a recipe: the bundled file validates, is what the demo runs, and goes through run_recipe."""

from pathlib import Path

import pytest
import yaml

import hf_compress
import hf_compress.recipes as recipes
from hf_compress.data import load_phishing_dataset
from hf_compress.demo import DEMO_RECIPE, DemoConfig, demo_recipe, run_demo
from hf_compress.recipes import Recipe, load_recipe


def test_bundled_demo_recipe_validates_and_is_what_the_default_demo_runs():
    assert DEMO_RECIPE.parent == Path(hf_compress.__file__).parent / "data"  # package data, next to the code
    recipe = load_recipe(DEMO_RECIPE, check_models=False)  # its input model is written by the demo
    assert [(s.type, s.folder_name, s.row_name) for s in recipe.stages] == [
        ("finetune", "1_teacher", "teacher"),
        ("distill", "2_student", "student (distilled)"),
        ("prune", "3_pruned", "pruned"),
        ("quantize", "4_quantized", "4-bit"),
    ]
    # the pruning schedule in the file is the one the demo computes for the embedded data (70% of 250 steps)
    num_train = len(load_phishing_dataset(seed=42)["train"])
    built = demo_recipe(DemoConfig(), num_train)
    bundled = yaml.safe_load(DEMO_RECIPE.read_text())
    for key in ("model", "output_dir"):
        built.pop(key), bundled.pop(key)
    assert built == bundled
    assert bundled["stages"][2]["config"]["end_step"] == int(0.7 * -(-num_train // 32))


class _Ran(Exception):
    pass


def test_demo_prepares_its_input_and_runs_the_recipe_through_run_recipe(tmp_path, monkeypatch):
    seen = {}

    def fake_run_recipe(recipe, **overrides):
        seen["recipe"] = recipe
        raise _Ran

    monkeypatch.setattr(recipes, "run_recipe", fake_run_recipe)
    out = tmp_path / "demo"
    flags = dict(teacher_hidden_size=64, teacher_layers=3, teacher_heads=2, teacher_intermediate_size=128)
    with pytest.raises(_Ran):
        run_demo(output_dir=str(out), max_examples=200, vocab_size=300, sparsity=0.5, num_threads=1, **flags)
    recipe = seen["recipe"]
    assert isinstance(recipe, Recipe) and recipe.model == str(out / "0_input")
    assert [s.name for s in recipe.stages] == ["teacher", "student", "pruned", "quantized"]
    assert recipe.stages[1].student == {"num_layers": 1, "num_heads": 1}  # a third of the layers, half the heads
    assert recipe.stages[2].config["sparsity"] == 0.5
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out / "0_input").iterdir()}
    # the recipe written next to the report is the one run, and `hf-compress run` accepts it
    again = load_recipe(out / "recipe.yaml")
    assert [(s.type, s.name, s.config, s.args) for s in again.stages] == [
        (s.type, s.name, s.config, s.args) for s in recipe.stages
    ]
