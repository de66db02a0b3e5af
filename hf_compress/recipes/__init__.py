"""Recipes: a YAML/JSON file that chains compression stages on one model, each a Trainer run or a one-shot step.

A recipe names a model (a saved folder or hub name), a dataset and a list of stages; every stage writes its own
folder under `output_dir` and a compression report (the stage's model next to the input model and the earlier
stages). The whole recipe is validated before the first stage runs.

```yaml
model: out/teacher                 # the input model (the teacher of a `distill` stage)
dataset: {name: phishing}          # or {path: urls.csv}, or {hub: shawhin/phishing-site-classification}
output_dir: out/recipe
stages:
  - type: finetune                 # a plain Trainer run on the labels (e.g. training the teacher); optional
    args: {num_train_epochs: 2}
  - type: distill                  # DistillationTrainer into create_student(model, **student)
    report_name: student (distilled)   # the stage's row in the report (default: its name)
    student: {num_layers: 2, num_heads: 2}
    args: {num_train_epochs: 2, temperature: 2.0, alpha: 0.5, learning_rate: 1.0e-3}
  - type: structured_prune         # structured_prune_(model, StructuredPruningConfig(**config)), then optional fine-tune
    config: {ffn_pruning_ratio: 0.5}
  - type: prune                    # PruningCallback(PruningConfig(**config)) during a fine-tune (args), or one-shot
    structured: {ffn_pruning_ratio: 0.25}   # optional: structured_prune_ first, in the same stage
    config: {sparsity: 0.3, schedule: cubic, end_step: 100}
    args: {num_train_epochs: 1}
    distill_from_teacher: true     # fine-tune with DistillationTrainer against the distill stage's teacher
  - type: quantize                 # quantize_model(model, **config)
    config: {method: nf4, double_quant: true}
```

`hf-compress demo` is one such recipe, shipped in the package (`hf_compress/data/demo_recipe.yaml`).

Modules: `recipe.py` (what a recipe is, and its validation), `fields.py` (type checks against the library's configs),
`data.py` (the `dataset` field), `runner.py` (running the stages).
"""

from ..errors import RecipeError
from .data import load_dataset_splits, load_text_blocks
from .recipe import STAGE_TYPES, Recipe, Stage, load_recipe
from .runner import check_recipe_output, run_recipe

__all__ = [
    "STAGE_TYPES",
    "Recipe",
    "RecipeError",
    "Stage",
    "check_recipe_output",
    "load_dataset_splits",
    "load_text_blocks",
    "load_recipe",
    "run_recipe",
]
