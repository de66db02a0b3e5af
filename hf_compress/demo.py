"""`hf-compress demo`: the reference pipeline end to end (teacher -> distilled student -> pruned -> 4-bit).

The pipeline is a recipe shipped in the package, [`DEMO_RECIPE`] (`hf_compress/data/demo_recipe.yaml`), run by
[`~hf_compress.run_recipe`] exactly as `hf-compress run` runs any recipe; this module only prepares what the recipe
starts from and applies the command-line flags to it. Offline (the default) the preparation trains a WordPiece
tokenizer on the phishing URL sample embedded in the package (see `hf_compress/data`) and builds a small BERT teacher
from a config; the recipe then trains it, distills, prunes and quantizes, in a few minutes on 2 CPU cores. With
network access, `--teacher google-bert/bert-base-uncased --dataset shawhin/phishing-site-classification` runs the
same stages on the hub model and dataset.

`output_dir` gets `0_input` (the prepared model and tokenizer), one folder per stage (`1_teacher`, `2_student`,
`3_pruned`, `4_quantized`), each a `from_pretrained`-loadable checkpoint with the tokenizer and a model card, the
recipe that ran (`recipe.yaml`, the flags applied) and the final table in `report.md`, `report.json` and `report.png`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from .errors import UnavailableError
from .utils.output import check_output_dir, prepare_output_dir
from .utils.threads import configure_threads

logger = logging.get_logger(__name__)


DEMO_RECIPE = Path(__file__).with_name("data") / "demo_recipe.yaml"
INPUT_DIR = "0_input"  # the prepared model the recipe starts from


@dataclass
class DemoConfig:
    """Settings of `hf-compress demo`; every field is a command-line flag (`--teacher_layers 4`).

    The defaults are tuned for the offline run: a BERT teacher (hidden 128, 6 layers, FFN 512) on the embedded
    phishing URLs, distilled into 2 layers with 2 heads (temperature 2, alpha 0.5), half of the FFN neurons removed
    (structured) plus 30% unstructured sparsity during a short distillation fine-tune, then NF4 4-bit weights with
    double quantization and bfloat16 storage of the layers 4-bit does not cover (embeddings, norms, classifier).
    """

    output_dir: str = field(default="hf_compress_demo", metadata={"help": "Folder of the stage outputs and report."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the stage folders of an earlier run."})
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Hub name or local folder of a pretrained encoder (e.g. google-bert/bert-base-uncased), "
            "fine-tuned as the teacher. Default: a small BERT trained from scratch on the data."
        },
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset with text/label(s) columns (e.g. shawhin/phishing-site-classification) or a local "
            "CSV with url,label columns. Default: the phishing URL sample embedded in hf_compress."
        },
    )
    max_examples: int | None = field(default=None, metadata={"help": "Use a seeded sample of at most N examples."})
    seed: int = field(default=42, metadata={"help": "Seed of the split, initialisation and training."})
    vocab_size: int = field(default=1024, metadata={"help": "Vocabulary of the tokenizer trained offline."})
    max_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per example (longer URLs are truncated); default 48 offline, 128 with --teacher."},
    )
    teacher_hidden_size: int = field(default=128, metadata={"help": "Hidden size of the teacher trained offline."})
    teacher_layers: int = field(default=6, metadata={"help": "Layers of the teacher trained offline."})
    teacher_heads: int = field(default=4, metadata={"help": "Attention heads of the teacher trained offline."})
    teacher_intermediate_size: int = field(default=512, metadata={"help": "FFN width of the teacher trained offline."})
    teacher_epochs: float = field(default=2.0, metadata={"help": "Epochs of teacher training (0: use as given)."})
    teacher_learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate of teacher training."})
    student_layers: int | None = field(
        default=None, metadata={"help": "Student layers (taken evenly from the teacher); default: a third."}
    )
    student_heads: int | None = field(default=None, metadata={"help": "Student attention heads; default: half."})
    distill_epochs: float = field(default=2.0, metadata={"help": "Epochs of distillation into the student."})
    distill_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of distillation."})
    temperature: float = field(default=2.0, metadata={"help": "Distillation temperature."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of the distillation loss (1 - alpha: labels)."})
    ffn_pruning_ratio: float = field(
        default=0.5, metadata={"help": "Share of FFN neurons removed from the student (structured), in [0, 1)."}
    )
    sparsity: float = field(
        default=0.3, metadata={"help": "Unstructured sparsity reached during the pruning fine-tune, in [0, 1)."}
    )
    prune_epochs: float = field(default=1.0, metadata={"help": "Epochs of distillation fine-tune after pruning."})
    prune_learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate of the pruning fine-tune."})
    quantization: str = field(default="nf4", metadata={"help": "Post-training quantization method: nf4, fp4, int8."})
    double_quant: bool = field(default=True, metadata={"help": "bitsandbytes double quantization of the scales."})
    compute_dtype: str = field(default="bfloat16", metadata={"help": "Matmul dtype of the 4-bit layers."})
    storage_dtype: str = field(
        default="bfloat16",
        metadata={"help": "dtype of the non-quantized weights of the 4-bit model: float32, bfloat16 or float16."},
    )
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    eval_batch_size: int = field(default=128, metadata={"help": "Evaluation / report batch size."})
    latency_batches: int = field(default=5, metadata={"help": "Timed forward passes per model in the report."})
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads of torch. Default: OMP_NUM_THREADS if set; else 1 on machines with up to 2 cores or "
            "when the load average reaches the core count (threads spin-wait for each other under contention), and at "
            "most the idle cores otherwise (hf_compress.utils.threads.configure_threads)."
        },
    )

    def __post_init__(self):
        if self.max_length is None:
            self.max_length = 128 if self.teacher is not None else 48
        for name in ("vocab_size", "max_length", "teacher_hidden_size", "teacher_layers", "teacher_heads"):
            _positive_int(name, getattr(self, name))
        for name in ("teacher_intermediate_size", "batch_size", "eval_batch_size"):
            _positive_int(name, getattr(self, name))
        for name in ("max_examples", "student_layers", "student_heads", "num_threads"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.latency_batches < 0:
            raise ValueError(f"latency_batches={self.latency_batches!r} must be >= 0.")
        for name in ("teacher_epochs", "distill_epochs", "prune_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0.")
        if self.distill_epochs <= 0:
            raise ValueError(f"distill_epochs={self.distill_epochs!r} must be > 0.")
        if self.teacher is None and self.teacher_epochs <= 0:
            raise ValueError("teacher_epochs must be > 0 when the teacher is trained from scratch (no --teacher).")
        if self.teacher_hidden_size % self.teacher_heads:
            raise ValueError(
                f"teacher_heads={self.teacher_heads} must divide teacher_hidden_size={self.teacher_hidden_size}."
            )
        if not 0 <= self.ffn_pruning_ratio < 1:
            raise ValueError(f"ffn_pruning_ratio={self.ffn_pruning_ratio!r} must be in [0, 1).")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity={self.sparsity!r} must be in [0, 1).")
        if self.storage_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"storage_dtype={self.storage_dtype!r}; allowed: float32, bfloat16, float16.")
        from .quantization.ptq import PTQ_METHODS

        if self.quantization not in PTQ_METHODS:
            raise ValueError(f"quantization={self.quantization!r}; allowed: {sorted(PTQ_METHODS)}.")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")


# ----------------------------------------------------------------------------------------------------------------
# data and models


def _dataset_spec(config: DemoConfig) -> dict[str, Any]:
    """The recipe's `dataset` field for the demo's flags."""
    if config.dataset is None:
        spec: dict[str, Any] = {"name": "phishing"}
    elif Path(config.dataset).is_file():
        spec = {"path": config.dataset}
    else:
        spec = {"hub": config.dataset}
    spec.update(max_length=config.max_length, seed=config.seed)
    if config.max_examples is not None:
        spec["max_examples"] = config.max_examples
    return spec


def load_demo_data(config: DemoConfig):
    """`DatasetDict` with train / validation / test splits and `text` / `label` columns, as the recipe loads it."""
    from .recipes import load_dataset_splits

    return load_dataset_splits(_dataset_spec(config))


def _load_teacher_from_hub(config: DemoConfig, num_labels: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.teacher)
        teacher = AutoModelForSequenceClassification.from_pretrained(config.teacher, num_labels=num_labels)
    except OSError as err:
        raise UnavailableError(
            f"teacher={config.teacher!r} could not be loaded ({err}). It must be a local model folder or a Hugging "
            "Face Hub name reachable over the network; offline, leave out --teacher to train a small BERT teacher "
            "from scratch on the data."
        ) from err
    return teacher, tokenizer


def build_teacher(config: DemoConfig, tokenizer, num_labels: int):
    """A BERT classifier from a config (no download), sized by the `teacher_*` fields."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(config.seed)
    bert_config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.teacher_hidden_size,
        num_hidden_layers=config.teacher_layers,
        num_attention_heads=config.teacher_heads,
        intermediate_size=config.teacher_intermediate_size,
        max_position_embeddings=config.max_length,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "legitimate", 1: "phishing"} if num_labels == 2 else None,
        label2id={"legitimate": 0, "phishing": 1} if num_labels == 2 else None,
    )
    return BertForSequenceClassification(bert_config)


# ----------------------------------------------------------------------------------------------------------------
# the recipe


def demo_recipe(config: DemoConfig, num_train_examples: int, teacher=None) -> dict[str, Any]:
    """The bundled recipe ([`DEMO_RECIPE`]) with the demo's flags applied.

    With the default flags and the embedded data (8,000 training URLs) this is the bundled file itself, apart from
    `model` / `output_dir` / `overwrite`. The pruning schedule depends on the data: unstructured sparsity is reached
    after 70% of the pruning fine-tune's steps.

    Args:
        config ([`DemoConfig`]): the flags.
        num_train_examples (`int`): size of the training split.
        teacher (`PreTrainedModel`, *optional*): a hub teacher; defaults to the teacher the demo builds offline.
    """
    import yaml

    recipe = yaml.safe_load(DEMO_RECIPE.read_text(encoding="utf-8"))
    root = Path(config.output_dir)
    recipe.update(model=str(root / INPUT_DIR), output_dir=str(root), dataset=_dataset_spec(config))
    if config.overwrite:
        recipe["overwrite"] = True
    recipe["report"].update(batch_size=config.eval_batch_size, latency_batches=config.latency_batches)
    stages = {stage["name"]: stage for stage in recipe["stages"]}
    training = {
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.eval_batch_size,
        "seed": config.seed,
    }
    distilling = {"temperature": config.temperature, "alpha": config.alpha}

    if config.teacher_epochs > 0:
        stages["teacher"]["args"].update(
            **training, num_train_epochs=config.teacher_epochs, learning_rate=config.teacher_learning_rate
        )
    else:  # a hub teacher used as it is
        del stages["teacher"]["args"]

    teacher_layers = teacher.config.num_hidden_layers if teacher is not None else config.teacher_layers
    teacher_heads = teacher.config.num_attention_heads if teacher is not None else config.teacher_heads
    stages["student"]["student"] = {
        "num_layers": config.student_layers or max(1, teacher_layers // 3),
        "num_heads": config.student_heads or max(1, teacher_heads // 2),
    }
    stages["student"]["args"].update(
        **training, **distilling, num_train_epochs=config.distill_epochs, learning_rate=config.distill_learning_rate
    )

    pruned = stages["pruned"]
    pruned["structured"] = {"ffn_pruning_ratio": config.ffn_pruning_ratio}
    if config.ffn_pruning_ratio == 0:
        del pruned["structured"]
    if config.prune_epochs > 0:
        steps_per_epoch = -(-num_train_examples // config.batch_size)
        end_step = max(1, int(0.7 * config.prune_epochs * steps_per_epoch))
        frequency = max(1, end_step // 10)
        pruned["config"] = {
            "sparsity": config.sparsity,
            "schedule": "cubic",
            "end_step": end_step,
            "frequency": frequency,
        }
        pruned["args"].update(
            **training, **distilling, num_train_epochs=config.prune_epochs, learning_rate=config.prune_learning_rate
        )
    else:  # one-shot pruning, no fine-tune
        pruned["config"] = {"sparsity": config.sparsity}
        del pruned["args"], pruned["distill_from_teacher"]

    quantized = stages["quantized"]
    quantized["config"].update(
        method=config.quantization, double_quant=config.double_quant, compute_dtype=config.compute_dtype
    )
    if teacher is not None and not hasattr(teacher, "classifier"):
        del quantized["config"]["skip_modules"]
    quantized["storage_dtype"] = config.storage_dtype
    quantized["report_name"] = "8-bit" if config.quantization == "int8" else "4-bit"
    return recipe


def run_demo(config: DemoConfig | None = None, **kwargs: Any):
    """Prepare the demo's input model and run [`DEMO_RECIPE`] on it; returns the final
    [`~hf_compress.CompressionReport`] (also saved under `output_dir`, with `report.png` and the `recipe.yaml` run).

    Args:
        config ([`DemoConfig`], *optional*): the settings; keyword arguments build one when left out.

    Example:

    ```python
    >>> from hf_compress.demo import run_demo
    >>> report = run_demo(output_dir="demo_out")  # doctest: +SKIP
    >>> print(report.to_markdown())  # doctest: +SKIP
    ```
    """
    from .data import train_url_tokenizer
    from .recipes import check_recipe_output, load_recipe, run_recipe

    config = config if config is not None else DemoConfig(**kwargs)
    configure_threads(config.num_threads)
    start = time.perf_counter()
    data = load_demo_data(config)  # hub names fail here, before anything is written
    num_labels = len(set(data["train"]["label"]))
    if config.teacher is not None:
        teacher, tokenizer = _load_teacher_from_hub(config, num_labels)
    else:
        tokenizer = train_url_tokenizer(
            data["train"]["text"], vocab_size=config.vocab_size, model_max_length=config.max_length
        )
        teacher = build_teacher(config, tokenizer, num_labels)
    recipe_fields = demo_recipe(config, len(data["train"]), teacher if config.teacher is not None else None)
    # validated before anything is written; the input model folder is written below, so it is checked at run time
    recipe = load_recipe(recipe_fields, check_models=False)
    root = Path(config.output_dir)
    check_recipe_output(recipe)
    check_output_dir(root / INPUT_DIR, config.overwrite, f"output_dir/{INPUT_DIR}")
    if (root / "recipe.yaml").exists() and not config.overwrite:
        raise FileExistsError(
            f"{str(root / 'recipe.yaml')!r} exists; pass --overwrite (overwrite=True) to replace it."
        )

    input_dir = prepare_output_dir(root / INPUT_DIR, config.overwrite, f"output_dir/{INPUT_DIR}")
    teacher.save_pretrained(input_dir)
    tokenizer.save_pretrained(input_dir)
    _write_recipe(root / "recipe.yaml", recipe_fields)
    del teacher
    prepared = time.perf_counter() - start

    report = run_recipe(recipe)
    timings = {"prepare": prepared, **{k: v for k, v in report.timings.items() if k != "total"}}
    timings["total"] = time.perf_counter() - start
    report.timings = timings  # type: ignore[attr-defined]
    extra = {"config": asdict(config), "timings_s": timings, "test_examples": len(data["test"])}
    _add_to_json(root / "report.json", extra)
    report.plot(root / "report.png", title="hf-compress demo: size vs test accuracy")
    logger.info(f"demo finished in {timings['total']:.0f} s; report in {root}")
    return report


def _write_recipe(path: Path, recipe_fields: dict[str, Any]) -> None:
    import yaml

    header = (
        f"# The recipe `hf-compress demo` ran: {DEMO_RECIPE} with the flags of this run applied.\n"
        f"# Run it again with: hf-compress run {path} --overwrite\n"
    )
    # no shared objects, so no YAML anchors; `overwrite` is left to the command line (--overwrite)
    plain = json.loads(json.dumps({k: v for k, v in recipe_fields.items() if k != "overwrite"}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(plain, sort_keys=False), encoding="utf-8")


def _add_to_json(path: Path, extra: dict[str, Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(extra)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


__all__ = ["DEMO_RECIPE", "DemoConfig", "build_teacher", "demo_recipe", "load_demo_data", "run_demo"]
