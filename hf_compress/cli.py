"""The `hf-compress` command line: `run RECIPE`, `report MODEL...` and `demo`.

Flags map to config fields (`HfArgumentParser`: `--teacher_layers` and `--teacher-layers` both work) and every
field is documented in `--help`. The command line prints the final Markdown table on stdout; training progress
shows through the Trainer's progress bars.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

_DESCRIPTION = "Knowledge distillation, pruning and quantization inside ordinary Hugging Face Trainer runs."


def _field_lines(cls, skip: set[str] = frozenset()) -> list[str]:
    lines = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_") or f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "").replace("\n", " ")
        lines.append(f"      {f.name} (default {default!r}): {help_text}")
    return lines


def _recipe_epilog() -> str:
    from transformers import TrainingArguments

    from .distillation import DistillationConfig
    from .pruning import PruningConfig
    from .pruning.structured import StructuredPruningConfig
    from .quantization import QATConfig
    from .recipes import STAGE_TYPES

    training_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    lines = [
        "A recipe (YAML or JSON) has the top-level fields:",
        "  model (required): input model folder or hub name (the teacher of a 'distill' stage)",
        "  output_dir (required): every stage writes <output_dir>/<n>_<name>/ with its model, model card and report",
        "  dataset: {name: phishing} (embedded, default) | {path: file.csv} | {hub: name}, plus text_column, "
        "label_column, max_length, max_examples, seed, train_split, eval_split",
        "  teacher, tokenizer: optional folders or hub names; overwrite: true|false",
        "  task: classification (default) | causal-lm (perplexity; dataset: {text_dir: folder with train.txt and "
        "test.txt, block_size, max_train_tokens, max_eval_tokens, calibration_batches}); model may be a .gguf file",
        "  report: batch_size, max_eval_batches, latency_batches, warmup (compression_report settings); "
        "include_input: false leaves the input model out of the table",
        f"  stages: a list; each has 'type' (one of {', '.join(STAGE_TYPES)}), an optional 'name' (its folder "
        "<n>_<name>) and an optional 'report_name' (its row in the table).",
        "",
        "Stage fields:",
        "  finetune: args (a plain Trainer run on the labels, e.g. to train a teacher; without args the model is "
        "kept as it is); distill_from_teacher",
        "  distill:  student: create_student arguments (num_layers, num_heads, layer_indices, intermediate_size, "
        "head_selection); args: DistillationConfig fields",
        "  prune:    config: PruningConfig fields; args (optional, a fine-tune with PruningCallback; without it the "
        "pruning is one-shot); distill_from_teacher: true|false; structured: StructuredPruningConfig fields applied "
        "first (optional)",
        "  structured_prune: config: StructuredPruningConfig fields; args (optional fine-tune); distill_from_teacher",
        "  quantize: config: quantize_model arguments (method, compute_dtype, double_quant, llm_int8_threshold, "
        "group_size, skip_modules); storage_dtype: float32|bfloat16|float16 for the weights left unquantized",
        "  qat:      config: QATCallback arguments (scheme, group_size, start_step, target_modules, exclude_modules); "
        "args (required); distill_from_teacher",
        "  args: any TrainingArguments field (num_train_epochs, learning_rate, per_device_train_batch_size, ...),",
        "        plus for distillation (distill stages, or distill_from_teacher: true) the DistillationConfig fields:",
        *_field_lines(DistillationConfig, skip=training_fields),
        "",
        "  PruningConfig fields:",
        *_field_lines(PruningConfig),
        "",
        "  StructuredPruningConfig fields:",
        *_field_lines(StructuredPruningConfig),
        "",
        "  QATConfig fields (qat stage 'config', with start_step):",
        *_field_lines(QATConfig),
        "",
        "The whole recipe is validated before the first stage runs; errors name the stage and the field.",
        "Examples: examples/recipes/*.yaml, and the demo's own recipe (hf_compress/data/demo_recipe.yaml).",
    ]
    return "\n".join(lines)


def _add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--num_threads",
        "--num-threads",
        type=int,
        default=None,
        help="CPU threads of torch. Default: OMP_NUM_THREADS if set; else 1 on machines with up to 2 cores or when "
        "the load average reaches the core count, at most the idle cores otherwise (latency is measured with it).",
    )


def build_parser() -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    from .demo import DemoConfig

    parser = argparse.ArgumentParser(prog="hf-compress", description=_DESCRIPTION)
    # Every sub-parser is an HfArgumentParser (a plain argparse parser when given no dataclass).
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{run,report,demo}", parser_class=HfArgumentParser
    )

    run = sub.add_parser(
        "run",
        help="Run a compression recipe (YAML/JSON): distill -> prune / structured_prune -> quantize / qat.",
        description="Run a compression recipe; each stage writes its own folder and a report.",
        epilog=_recipe_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("recipe", help="Path of the recipe file (.yaml, .yml or .json).")
    run.add_argument("--output_dir", "--output-dir", default=None, help="Replaces the recipe's output_dir.")
    run.add_argument(
        "--overwrite", action="store_true", default=None, help="Replace existing stage folders (recipe: overwrite)."
    )
    run.add_argument("--json", default=None, help="Also write the final report as JSON to this path.")
    run.add_argument("--plot", default=None, help="Also draw the size-vs-quality plot (PNG) to this path.")
    _add_threads_flag(run)

    report = sub.add_parser(
        "report",
        help="Compare saved models: parameters, non-zeros, MB on disk, bits/param, latency, task metrics.",
        description="Measure saved models side by side; the first is the reference of the ratio columns.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    report.add_argument(
        "models", nargs="+", help="Saved model folders (from save_pretrained) or GGUF files (loaded dequantized)."
    )
    report.add_argument("--names", nargs="+", default=None, help="Row names (default: the folder names).")
    report.add_argument(
        "--dataset",
        default=None,
        help="Evaluation data: 'phishing' (the embedded URLs' test split) or a CSV with url,label columns. Without "
        "it, only size figures are reported.",
    )
    report.add_argument("--split", default="test", help="Split of --dataset to evaluate on.")
    report.add_argument(
        "--max_length", "--max-length", type=int, default=None, help="Tokens per example (default: the tokenizer's)."
    )
    report.add_argument("--batch_size", "--batch-size", type=int, default=32, help="Evaluation batch size.")
    report.add_argument("--max_eval_batches", "--max-eval-batches", type=int, default=None, help="Batches at most.")
    report.add_argument("--latency_batches", "--latency-batches", type=int, default=10, help="Timed batches.")
    report.add_argument("--warmup", type=int, default=2, help="Untimed warm-up batches.")
    report.add_argument("--json", default=None, help="Write the report as JSON to this path.")
    report.add_argument("--plot", default=None, help="Draw the size-vs-quality plot (PNG) to this path.")
    _add_threads_flag(report)

    sub.add_parser(
        "demo",
        dataclass_types=[DemoConfig],
        help="The reference pipeline offline: teacher -> distilled student -> pruned -> 4-bit, with the table.",
        description="Train a teacher on the embedded phishing URLs, distill, prune, quantize to 4 bits and print "
        "the comparison table (report.md / report.json / report.png in output_dir). The stages are the recipe "
        "hf_compress/data/demo_recipe.yaml, run as `hf-compress run` runs any recipe; the flags below are applied "
        "to it. Fully offline by default; --teacher and --dataset take hub names when a network is available.",
    )
    return parser


def _report_command(ns: argparse.Namespace) -> int:
    from .reporting import compression_report
    from .utils.loading import load_tokenizer
    from .utils.model_path import check_saved_model_folder

    names = ns.names or [str(p).rstrip("/").split("/")[-1] for p in ns.models]
    if len(names) != len(ns.models):
        raise SystemExit(f"hf-compress report: --names gives {len(names)} names for {len(ns.models)} models.")
    for index, folder in enumerate(ns.models):  # before loading anything (a missing folder is not a Hub name here)
        check_saved_model_folder(folder, f"models[{index}]")
    eval_dataset = tokenizer = max_length = None
    if ns.dataset is not None:
        from .data import load_phishing_dataset

        data = load_phishing_dataset(None if ns.dataset == "phishing" else ns.dataset)
        eval_dataset = data[ns.split]
        tokenizer = load_tokenizer(ns.models[0])  # a `.gguf` file carries its tokenizer
        max_length = ns.max_length or min(tokenizer.model_max_length, 512)
    report = compression_report(
        dict(zip(names, ns.models)),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        batch_size=ns.batch_size,
        max_eval_batches=ns.max_eval_batches,
        latency_batches=ns.latency_batches,
        warmup=ns.warmup,
        max_length=max_length,
    )
    print(report.to_markdown())
    if ns.json:
        report.to_json(ns.json)
    if ns.plot:
        report.plot(ns.plot)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hf-compress` console script."""
    from .errors import RecipeError, UnavailableError

    parser = build_parser()
    ns = parser.parse_args(list(argv) if argv is not None else None)
    if getattr(ns, "num_threads", None) is not None and ns.num_threads < 1:
        parser.error(f"--num_threads={ns.num_threads} must be a positive integer.")
    try:
        return _dispatch(ns)
    except (RecipeError, UnavailableError, FileExistsError, FileNotFoundError) as err:
        # Mistakes in what was asked for: one clear line and exit status 2, no traceback.
        parser.exit(2, f"hf-compress {ns.command}: error: {err}\n")


def _dispatch(ns: argparse.Namespace) -> int:
    if ns.command in ("run", "report"):
        from .utils.threads import configure_threads

        configure_threads(ns.num_threads)  # the demo does it from its own --num_threads
    if ns.command == "run":
        from .recipes import run_recipe

        report = run_recipe(ns.recipe, output_dir=ns.output_dir, overwrite=ns.overwrite)
        print(report.to_markdown())
        if ns.json:
            report.to_json(ns.json)
        if ns.plot:
            report.plot(ns.plot)
        return 0
    if ns.command == "report":
        return _report_command(ns)
    from .demo import DEMO_RECIPE, DemoConfig, run_demo

    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(DemoConfig) if hasattr(ns, f.name)}
    report = run_demo(DemoConfig(**values))
    print(report.to_markdown())
    timings = getattr(report, "timings", {})
    if timings:
        print("\nstage wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"\nreport.md, report.json and report.png written to {values['output_dir']}")
    print(
        f"The stages are the recipe {DEMO_RECIPE}: copy it, edit it and run it with `hf-compress run <file>`. "
        f"This run's recipe (your flags applied): {values['output_dir']}/recipe.yaml"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
