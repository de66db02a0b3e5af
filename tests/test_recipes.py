"""Recipes: a two-stage run on tiny models, and malformed recipes failing before any training."""

import json

import pytest
import torch
import yaml
from tiny_models import save_tiny_url_teacher
from transformers import BertForSequenceClassification

from hf_compress import load_recipe, run_recipe
from hf_compress.recipes import RecipeError
from hf_compress.reporting import MODEL_CARD_BEGIN


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    save_tiny_url_teacher(folder, layers=2)
    return folder


def _recipe(teacher_dir, output_dir, stages):
    return {
        "model": str(teacher_dir),
        "output_dir": str(output_dir),
        "dataset": {"name": "phishing", "max_examples": 96, "max_length": 32},
        "report": {"batch_size": 16, "latency_batches": 1, "warmup": 0},
        "stages": stages,
    }


def test_two_stage_recipe_distill_then_prune(teacher_dir, tmp_path):
    stages = [
        {"type": "distill", "student": {"num_layers": 1}, "args": {"max_steps": 2, "per_device_train_batch_size": 8}},
        {
            "type": "prune",
            "name": "sparse",
            "config": {"sparsity": 0.5},
            "args": {"max_steps": 2, "per_device_train_batch_size": 8, "temperature": 2.0},
            "distill_from_teacher": True,
        },
    ]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(teacher_dir, tmp_path / "out", stages)))
    report = run_recipe(path)

    assert [r.name for r in report.rows] == ["input", "distill", "sparse"]
    student = BertForSequenceClassification.from_pretrained(tmp_path / "out" / "1_distill")
    assert student.config.num_hidden_layers == 1
    pruned = BertForSequenceClassification.from_pretrained(tmp_path / "out" / "2_sparse")
    dense = pruned.bert.encoder.layer[0].intermediate.dense.weight
    assert (dense == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert report["sparse"].nonzero_parameters < report["distill"].nonzero_parameters
    assert report["distill"].parameters < report["input"].parameters
    for folder in ("1_distill", "2_sparse"):
        stage_report = json.loads((tmp_path / "out" / folder / "report.json").read_text())
        assert stage_report["rows"][0]["name"] == "input"
        assert MODEL_CARD_BEGIN in (tmp_path / "out" / folder / "README.md").read_text()
        assert "accuracy" in stage_report["rows"][-1]["metrics"]
    assert "unstructured pruning" in (tmp_path / "out" / "2_sparse" / "README.md").read_text()

    # a second run refuses to overwrite the stage folders, before training anything
    before = (tmp_path / "out" / "1_distill" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite"):
        run_recipe(path)
    assert (tmp_path / "out" / "1_distill" / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"type": "distill"}, {"type": "sparsify"}], r"stage 1 \('sparsify'\): unknown stage type 'sparsify'"),
        (
            [{"type": "prune", "name": "p", "config": {"sparsty": 0.5}}],
            r"stage 0 \('p', type 'prune'\): unknown field config.'sparsty'.*Did you mean 'sparsity'",
        ),
        (
            [{"type": "distill", "args": {"learning_rate": "fast"}}],
            r"stage 0 \('distill', type 'distill'\): field args.learning_rate has the wrong type",
        ),
        (
            [{"type": "distill", "student": {"num_layers": "two"}}],
            r"stage 0 \('distill', type 'distill'\): field student.num_layers has the wrong type",
        ),
        (
            [{"type": "distill"}, {"type": "structured_prune", "config": {"ffn_pruning_ratio": 1.5}}],
            r"stage 1 \('structured_prune', type 'structured_prune'\): field 'config': ffn_pruning_ratio",
        ),
        ([{"type": "distill", "args": {"alpha": 2.0}}], r"stage 0 \('distill', type 'distill'\): field 'args': alpha"),
        ([{"type": "quantize", "config": {"method": "nf3"}}], r"stage 0 .*field 'config': method='nf3'"),
        ([{"type": "distill", "epochs": 2}], r"stage 0 .*unknown field 'epochs'"),
        ([{"type": "quantize"}, {"type": "prune"}], r"stage 1 .*quantization must be the last stage"),
        ([{"type": "quantize", "storage_dtype": "int3"}], r"stage 0 .*field 'storage_dtype'='int3'"),
        ([{"type": "prune", "distill_from_teacher": True, "args": {}}], r"stage 0 .*needs a teacher"),
    ],
)
def test_malformed_recipe_fails_before_training(teacher_dir, tmp_path, stages, message):
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=message):
        run_recipe(_recipe(teacher_dir, out, stages))
    assert not out.exists()  # nothing ran, nothing was written


def test_top_level_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="unknown field 'stage'.*Did you mean 'stages'"):
        load_recipe({"model": "m", "output_dir": "o", "stage": []})
    with pytest.raises(RecipeError, match="'model' is required"):
        load_recipe({"output_dir": "o", "stages": [{"type": "quantize"}]})
    with pytest.raises(RecipeError, match="'stages' must be a non-empty list"):
        load_recipe({"model": "m", "output_dir": "o", "stages": []}, check_models=False)
    with pytest.raises(FileNotFoundError):
        load_recipe(tmp_path / "missing.yaml")
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps({"model": "m", "output_dir": "o", "stages": [{"type": "qat", "args": {"max_steps": 1}}]})
    )
    recipe = load_recipe(path, check_models=False, output_dir=str(tmp_path / "elsewhere"), overwrite=None)
    assert recipe.output_dir == str(tmp_path / "elsewhere") and recipe.stages[0].folder_name == "1_qat"


def test_new_config_fields_are_picked_up(monkeypatch):
    """Validation reads dataclasses.fields, so a field added to a config is accepted (and type-checked) at once."""
    import dataclasses

    import hf_compress.pruning as pruning

    @dataclasses.dataclass
    class ExtendedPruningConfig(pruning.PruningConfig):
        warmup_fraction: float = dataclasses.field(default=0.0, metadata={"help": "new"})

    monkeypatch.setattr(pruning, "PruningConfig", ExtendedPruningConfig)
    recipe = load_recipe(
        {"model": "m", "output_dir": "o", "stages": [{"type": "prune", "config": {"warmup_fraction": 0.1}}]},
        check_models=False,
    )
    assert recipe.stages[0].config == {"warmup_fraction": 0.1}
    with pytest.raises(RecipeError, match="config.warmup_fraction has the wrong type"):
        load_recipe(
            {"model": "m", "output_dir": "o", "stages": [{"type": "prune", "config": {"warmup_fraction": "x"}}]}
        )


def test_overwrite_replaces_only_what_the_recipe_wrote(teacher_dir, tmp_path):
    """Stage folders and report files are checked before the first stage; overwrite keeps the user's files."""
    recipe = _recipe(
        teacher_dir, tmp_path / "out", [{"type": "structured_prune", "config": {"ffn_pruning_ratio": 0.5}}]
    )
    stage = tmp_path / "out" / "1_structured_prune"
    stage.mkdir(parents=True)
    (stage / "notes.txt").write_text("mine")
    (stage / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    (tmp_path / "out" / "data.csv").write_text("url,label\n")
    with pytest.raises(FileExistsError, match=r"1_structured_prune.*overwrite"):
        run_recipe(recipe)
    assert sorted(p.name for p in stage.iterdir()) == ["model-00001-of-00002.safetensors", "notes.txt"]

    report = run_recipe(recipe, overwrite=True)
    assert [r.name for r in report.rows] == ["input", "structured_prune"]
    assert (stage / "notes.txt").read_text() == "mine"
    assert not (stage / "model-00001-of-00002.safetensors").exists()  # a stale shard of ours is removed
    assert (stage / "model.safetensors").is_file() and (tmp_path / "out" / "report.json").is_file()
    assert (tmp_path / "out" / "data.csv").read_text() == "url,label\n"


def test_finetune_stage_structured_prune_in_one_stage_and_report_names(teacher_dir, tmp_path):
    """The stage features the demo's recipe uses: finetune, prune with `structured`, report_name, include_input."""
    recipe = _recipe(
        teacher_dir,
        tmp_path / "out",
        [
            {"type": "finetune", "name": "teacher", "args": {"max_steps": 2, "learning_rate": 1e-3}},
            {
                "type": "prune",
                "name": "pruned",
                "report_name": "pruned (50% FFN, 30% sparse)",
                "structured": {"ffn_pruning_ratio": 0.5},
                "config": {"sparsity": 0.3},
            },
        ],
    )
    recipe["report"]["include_input"] = False
    report = run_recipe(recipe)
    assert [r.name for r in report.rows] == ["teacher", "pruned (50% FFN, 30% sparse)"]
    assert set(report.timings) == {"data", "teacher", "pruned", "total"}
    trained = BertForSequenceClassification.from_pretrained(tmp_path / "out" / "1_teacher")
    untouched = BertForSequenceClassification.from_pretrained(teacher_dir)
    assert not torch.equal(trained.classifier.weight, untouched.classifier.weight)  # the finetune stage trained
    pruned = BertForSequenceClassification.from_pretrained(tmp_path / "out" / "2_pruned")
    dense = pruned.bert.encoder.layer[0].intermediate.dense.weight
    assert dense.shape[0] == untouched.config.intermediate_size // 2
    assert (dense == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert report.rows[1].parameters < report.rows[0].parameters
    card = (tmp_path / "out" / "2_pruned" / "README.md").read_text()
    assert "structured pruning" in card and "unstructured pruning" in card
    with pytest.raises(RecipeError, match=r"report.include_input must be true or false"):
        load_recipe({**recipe, "report": {"include_input": "no"}})
    with pytest.raises(RecipeError, match=r"field 'structured'.*ffn_pruning_ratio"):
        load_recipe({**recipe, "stages": [{"type": "prune", "structured": {"ffn_pruning_ratio": 1.5}}]})
