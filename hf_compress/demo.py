"""`hf-compress demo`: the reference pipeline end to end (teacher -> distilled student -> pruned -> 4-bit).

Offline (the default) it runs on the phishing URL sample embedded in the package (see `hf_compress/data`), with a
WordPiece tokenizer trained on it and a small BERT teacher trained from scratch, in a few minutes on 2 CPU cores.
With network access, `--teacher google-bert/bert-base-uncased --dataset shawhin/phishing-site-classification` runs
the same stages on the hub model and dataset.

Every stage writes its own folder under `output_dir` (`1_teacher`, `2_student`, `3_pruned`, `4_quantized`), each a
`from_pretrained`-loadable checkpoint with the tokenizer and a model card; the final table goes to
`report.md`, `report.json` and `report.png`.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from .errors import UnavailableError

logger = logging.get_logger(__name__)


STAGE_DIRS = {"teacher": "1_teacher", "student": "2_student", "pruned": "3_pruned", "quantized": "4_quantized"}


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
            "help": "CPU threads of torch. Default: 1 on machines with up to 2 cores or when the load average reaches "
            "the core count (threads spin-wait for each other under contention); torch's own choice otherwise."
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


def _set_threads(num_threads: int | None) -> None:
    # Measured here (torch 2.13, 2 cores): a training step of the demo's teacher took 0.34 s with 1 thread and 2.5 s
    # with 2 threads while other processes used the cores, because OpenMP threads spin-wait for a descheduled peer.
    # The same happened to the distillation stage with 2 threads (8 steps/s idle, 0.4 steps/s next to one busy process).
    # On a nearly idle machine 2 threads are faster (teacher stage: 64 s, against 118 s with 1 thread next to one
    # other busy process), but a shared machine is the common case for a demo: on machines of up to 2 cores, or
    # when the load average reaches the core count, one thread is used unless --num_threads says otherwise.
    if num_threads is None and not torch.cuda.is_available():
        cores = os.cpu_count() or 1
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if cores <= 2 or load >= cores:
            num_threads = 1
            logger.warning(f"Using 1 CPU thread ({cores} cores, load average {load:.1f}); see --num_threads.")
    if num_threads is not None:
        torch.set_num_threads(num_threads)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")


def prepare_output_dir(output_dir: str | os.PathLike, stages: list[str], overwrite: bool) -> dict[str, Path]:
    """The stage folders under `output_dir`; refuses to touch existing non-empty ones unless `overwrite`."""
    root = Path(output_dir)
    folders = {name: root / name for name in stages}
    existing = [str(p) for p in folders.values() if p.is_dir() and any(p.iterdir())]
    if existing and not overwrite:
        raise FileExistsError(
            f"output_dir={str(root)!r} already holds stage folders {existing}; pass --overwrite (overwrite=True) to "
            "replace them, or choose another output_dir."
        )
    for path in folders.values():
        if path.is_dir():
            shutil.rmtree(path)
    root.mkdir(parents=True, exist_ok=True)
    return folders


# ----------------------------------------------------------------------------------------------------------------
# data and models


def load_demo_data(config: DemoConfig):
    """`DatasetDict` with train / validation / test splits and `text` / `label` columns."""
    if config.dataset is None:
        from .data import load_phishing_dataset

        return load_phishing_dataset(seed=config.seed, max_examples=config.max_examples)
    if Path(config.dataset).is_file():
        from .data import load_phishing_dataset

        return load_phishing_dataset(config.dataset, seed=config.seed, max_examples=config.max_examples)
    from datasets import DatasetDict, load_dataset

    try:
        raw = load_dataset(config.dataset)
    except Exception as err:  # offline errors come as ConnectionError, OSError, HF hub errors, ...
        raise UnavailableError(
            f"dataset={config.dataset!r} could not be loaded from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Without network access, leave out --dataset to use the phishing URL data embedded in hf_compress."
        ) from err
    if "train" not in raw:
        raise ValueError(f"dataset={config.dataset!r} has no 'train' split (splits: {list(raw)}).")

    def normalize(ds):
        if "labels" in ds.column_names and "label" not in ds.column_names:
            ds = ds.rename_column("labels", "label")
        if "text" not in ds.column_names:
            text_cols = [c for c in ds.column_names if c in ("url", "sentence", "content")]
            if not text_cols:
                raise ValueError(f"dataset={config.dataset!r} needs a text column, has {ds.column_names}.")
            ds = ds.rename_column(text_cols[0], "text")
        return ds.select_columns(["text", "label"])

    splits = {name: normalize(ds) for name, ds in raw.items()}
    if "test" not in splits:
        held = splits["train"].train_test_split(test_size=0.3, seed=config.seed)
        rest = held["test"].train_test_split(test_size=0.5, seed=config.seed)
        splits = {"train": held["train"], "validation": rest["train"], "test": rest["test"]}
    elif "validation" not in splits:
        held = splits["train"].train_test_split(test_size=0.15, seed=config.seed)
        splits = {"train": held["train"], "validation": held["test"], "test": splits["test"]}
    if config.max_examples is not None:
        splits = {
            k: v.shuffle(seed=config.seed).select(range(min(len(v), config.max_examples))) for k, v in splits.items()
        }
    return DatasetDict(splits)


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


def _training_args(cls, config: DemoConfig, output_dir: Path, epochs: float, lr: float, **kwargs):
    return cls(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        learning_rate=lr,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        warmup_steps=0.06,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        eval_strategy="no",
        save_strategy="no",
        logging_steps=50,
        report_to="none",
        seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        **kwargs,
    )


def _save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------------
# the pipeline


def run_demo(config: DemoConfig | None = None, **kwargs: Any):
    """Run the demo pipeline and return its [`~hf_compress.CompressionReport`] (also saved under `output_dir`).

    Args:
        config ([`DemoConfig`], *optional*): the settings; keyword arguments build one when left out.

    Example:

    ```python
    >>> from hf_compress.demo import run_demo
    >>> report = run_demo(output_dir="demo_out")  # doctest: +SKIP
    >>> print(report.to_markdown())  # doctest: +SKIP
    ```
    """
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from .data import train_url_tokenizer
    from .distillation import DistillationConfig, DistillationTrainer, create_student
    from .metrics import make_compute_metrics
    from .pruning import PruningCallback, PruningConfig, StructuredPruningConfig, structured_prune_
    from .quantization import quantize_model
    from .reporting import (
        CompressionReportCallback,
        compression_report,
        disk_bytes,
        size_figures,
        write_model_card,
    )

    config = config if config is not None else DemoConfig(**kwargs)
    _set_threads(config.num_threads)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    folders = prepare_output_dir(config.output_dir, list(STAGE_DIRS.values()), config.overwrite)
    folders = {key: folders[name] for key, name in STAGE_DIRS.items()}
    root = Path(config.output_dir)

    data = load_demo_data(config)
    num_labels = len(set(data["train"]["label"]))
    if config.teacher is not None:
        teacher, tokenizer = _load_teacher_from_hub(config, num_labels)
    else:
        tokenizer = train_url_tokenizer(
            data["train"]["text"], vocab_size=config.vocab_size, model_max_length=config.max_length
        )
        teacher = build_teacher(config, tokenizer, num_labels)
    encoded = data.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=config.max_length),
        batched=True,
        remove_columns=["text"],
    )
    collator = DataCollatorWithPadding(tokenizer)
    compute_metrics = make_compute_metrics("classification")
    teacher_layers = teacher.config.num_hidden_layers
    student_layers = config.student_layers or max(1, teacher_layers // 3)
    student_heads = config.student_heads or max(1, teacher.config.num_attention_heads // 2)
    timings["data"] = time.perf_counter() - start

    # 1. teacher
    t0 = time.perf_counter()
    if config.teacher_epochs > 0:
        args = _training_args(
            TrainingArguments, config, folders["teacher"], config.teacher_epochs, config.teacher_learning_rate
        )
        Trainer(
            model=teacher,
            args=args,
            train_dataset=encoded["train"],
            data_collator=collator,
            processing_class=tokenizer,
        ).train()
    teacher.eval()
    _save(teacher, tokenizer, folders["teacher"])
    teacher_figures = {"name": "teacher", **size_figures(teacher, disk_bytes(folders["teacher"]))}
    write_model_card(folders["teacher"], size_figures(teacher, disk_bytes(folders["teacher"])), ["none (teacher)"])
    timings["teacher"] = time.perf_counter() - t0

    # 2. distilled student: fewer layers and heads, initialised from the teacher's layers
    t0 = time.perf_counter()
    student = create_student(teacher, num_layers=student_layers, num_heads=student_heads)
    distill_methods = [
        f"knowledge distillation from the {teacher_layers}-layer teacher into {student_layers} layers with "
        f"{student_heads} heads (forward KL, temperature={config.temperature}, alpha={config.alpha})"
    ]
    args = _training_args(
        DistillationConfig,
        config,
        folders["student"],
        config.distill_epochs,
        config.distill_learning_rate,
        temperature=config.temperature,
        alpha=config.alpha,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=encoded["train"],
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[CompressionReportCallback(distill_methods, reference=teacher_figures)],
    )
    trainer.train()
    student.eval()
    trainer.save_model(str(folders["student"]))
    timings["student"] = time.perf_counter() - t0

    # 3. pruned: FFN neurons removed (structured), then unstructured sparsity reached during a distillation fine-tune
    t0 = time.perf_counter()
    pruned = copy.deepcopy(student)
    prune_methods = list(distill_methods)
    if config.ffn_pruning_ratio > 0:
        structured_prune_(pruned, StructuredPruningConfig(ffn_pruning_ratio=config.ffn_pruning_ratio))
        prune_methods.append(f"structured pruning: {100 * config.ffn_pruning_ratio:.0f}% of FFN neurons removed (L2)")
    callbacks: list[Any] = []
    if config.sparsity > 0:
        steps_per_epoch = -(-len(encoded["train"]) // config.batch_size)
        end_step = max(1, int(0.7 * config.prune_epochs * steps_per_epoch))
        callbacks.append(
            PruningCallback(
                PruningConfig(
                    sparsity=config.sparsity, schedule="cubic", end_step=end_step, frequency=max(1, end_step // 10)
                )
            )
        )
        prune_methods.append(f"unstructured magnitude pruning to {100 * config.sparsity:.0f}% (cubic schedule)")
    if config.prune_epochs > 0:
        args = _training_args(
            DistillationConfig,
            config,
            folders["pruned"],
            config.prune_epochs,
            config.prune_learning_rate,
            temperature=config.temperature,
            alpha=config.alpha,
        )
        trainer = DistillationTrainer(
            model=pruned,
            teacher_model=teacher,
            args=args,
            train_dataset=encoded["train"],
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=callbacks + [CompressionReportCallback(prune_methods, reference=teacher_figures)],
        )
        trainer.train()
        trainer.save_model(str(folders["pruned"]))
    else:
        if config.sparsity > 0:
            from .pruning import prune_

            prune_(pruned, PruningConfig(sparsity=config.sparsity))
        _save(pruned, tokenizer, folders["pruned"])
        write_model_card(folders["pruned"], size_figures(pruned), prune_methods, teacher_figures)
    pruned.eval()
    timings["pruned"] = time.perf_counter() - t0

    # 4. post-training quantization: 4-bit Linear weights; the rest stored in storage_dtype
    t0 = time.perf_counter()
    to_quantize = copy.deepcopy(pruned).to(getattr(torch, config.storage_dtype))
    classifier_names = [n for n, _ in to_quantize.named_children() if n == "classifier"]
    quantized = quantize_model(
        to_quantize,
        config.quantization,
        double_quant=config.double_quant,
        compute_dtype=config.compute_dtype,
        skip_modules=classifier_names,  # the pooler is quantized too; only the 2-way classifier stays
        output_dir=folders["quantized"],
        processing_class=tokenizer,
        overwrite=True,
    )
    del to_quantize
    quant_methods = prune_methods + [
        f"post-training quantization: {config.quantization} Linear weights"
        + (" with double quantization" if config.double_quant and config.quantization != "int8" else "")
        + f", {config.compute_dtype} compute, other weights stored in {config.storage_dtype}"
    ]
    write_model_card(
        folders["quantized"], size_figures(quantized, disk_bytes(folders["quantized"])), quant_methods, teacher_figures
    )
    timings["quantized"] = time.perf_counter() - t0

    # 5. the report, on the held-out test split
    t0 = time.perf_counter()
    names = {"teacher": "teacher", "student": "student (distilled)", "pruned": "pruned", "quantized": "4-bit"}
    if config.quantization == "int8":
        names["quantized"] = "8-bit"
    report = compression_report(
        {names[key]: folders[key] for key in STAGE_DIRS},
        eval_dataset=encoded["test"],
        compute_metrics=compute_metrics,
        task="classification",
        processing_class=tokenizer,
        data_collator=collator,
        batch_size=config.eval_batch_size,
        latency_batches=config.latency_batches,
        warmup=1,
        methods={
            names["teacher"]: [],
            names["student"]: distill_methods,
            names["pruned"]: prune_methods,
            names["quantized"]: quant_methods,
        },
    )
    timings["report"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    report.to_json(root / "report.json")
    extra = {"config": asdict(config), "timings_s": timings, "test_examples": len(encoded["test"])}
    _add_to_json(root / "report.json", extra)
    (root / "report.md").write_text(report.to_markdown() + "\n", encoding="utf-8")
    report.plot(root / "report.png", title="hf-compress demo: size vs test accuracy")
    report.timings = timings  # type: ignore[attr-defined]
    logger.info(f"demo finished in {timings['total']:.0f} s; report in {root}")
    return report


def _add_to_json(path: Path, extra: dict[str, Any]) -> None:
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(extra)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


__all__ = [
    "DemoConfig",
    "STAGE_DIRS",
    "UnavailableError",
    "build_teacher",
    "load_demo_data",
    "prepare_output_dir",
    "run_demo",
]
