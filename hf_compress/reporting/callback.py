"""[`CompressionReportCallback`]: the size figures of the model being trained, in the Trainer's logs and in the model
card of every save."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from ..utils import unwrap_model
from ..utils.callbacks import dispatching_trainer
from .measure import disk_bytes, size_figures
from .render import restore_model_card_section, write_model_card

logger = logging.get_logger(__name__)


def _default_methods(args: Any, model: nn.Module, figures: Mapping[str, Any]) -> list[str]:
    methods = []
    if hasattr(args, "temperature") and hasattr(args, "alpha") and hasattr(args, "loss_type"):
        methods.append(
            f"knowledge distillation ({args.loss_type}, temperature={args.temperature}, alpha={args.alpha})"
        )
    if figures.get("sparsity", 0) > 0.01:
        methods.append(f"pruning ({100 * figures['sparsity']:.1f}% of all parameters are zero)")
    qc = getattr(getattr(unwrap_model(model), "config", None), "quantization_config", None)
    if qc is not None:
        methods.append(f"quantization ({getattr(qc, 'quant_method', type(qc).__name__)})")
    return methods


def _log_names(prefix: str, figures: Mapping[str, Any]) -> dict[str, Any]:
    """`{prefix}_<figure>`, with whole-model sparsity as `sparsity_model` (distinct from pruning's `sparsity_targeted`)."""
    return {f"{prefix}_{'sparsity_model' if k == 'sparsity' else k}": v for k, v in figures.items()}


def compression_settings(args: Any = None, callbacks: Sequence[Any] = ()) -> dict[str, dict[str, Any]]:
    """The compression settings of a run, by method, for its model card: distillation (temperature, alpha, loss_type,
    ... from a [`DistillationConfig`]), pruning ([`PruningCallback`]'s config), quantization-aware training
    ([`QATCallback`]) and post-training quantization ([`PostTrainingQuantizationCallback`])."""
    settings: dict[str, dict[str, Any]] = {}
    if all(hasattr(args, k) for k in ("temperature", "alpha", "loss_type")):
        distillation = {"temperature": args.temperature, "alpha": args.alpha, "loss_type": args.loss_type}
        if args.loss_type == "jsd":
            distillation["jsd_beta"] = getattr(args, "jsd_beta", None)
        if getattr(args, "hidden_loss_weight", 0) > 0:
            distillation["hidden_loss_weight"] = args.hidden_loss_weight
            distillation["hidden_loss_type"] = args.hidden_loss_type
        settings["distillation"] = distillation
    for callback in callbacks:
        kind = type(callback).__name__ if type(callback).__module__.startswith("hf_compress.") else None
        if kind == "PruningCallback":
            c = callback.config
            settings["pruning"] = {
                "method": c.method,
                "sparsity": c.target_sparsity,
                "pattern": c.pattern,
                "scope": c.scope,
                "schedule": c.schedule,
                "start_step": c.start_step,
                "end_step": c.end_step if c.schedule != "oneshot" else None,
            }
        elif kind == "QATCallback":
            c = callback.config
            settings["quantization-aware training"] = {
                "scheme": c.scheme,
                "group_size": c.group_size,
                "start_step": callback.start_step,
            }
        elif kind == "PostTrainingQuantizationCallback":
            settings["post-training quantization"] = {"method": callback.method, **callback.quantize_kwargs}
    return settings


def hub_name(model: nn.Module | None) -> str | None:
    """The Hub name a model was loaded from (`config._name_or_path`), or `None` for a local folder or no name."""
    from ..utils.model_path import looks_like_hub_id

    config = getattr(unwrap_model(model), "config", None) if model is not None else None
    name = getattr(config, "_name_or_path", None)
    if isinstance(name, str) and name and looks_like_hub_id(name) and not Path(name).exists():
        return name
    return None


def keep_compression_card_on_push(trainer) -> None:
    """Make `trainer.create_model_card()` (called by `push_to_hub`) keep the hf_compress section of the model card,
    list the compression settings with the training hyperparameters and add the hf_compress tags.

    `Trainer.create_model_card` rewrites `README.md` from scratch; this wraps it on this trainer instance only.
    [`DistillationTrainer`] does the same in its own `create_model_card`.
    """
    if getattr(trainer, "_hf_compress_keeps_card", False):
        return
    original = trainer.create_model_card

    def create_model_card(*args, **kwargs):
        path = Path(trainer.args.output_dir) / "README.md"
        previous = path.read_text(encoding="utf-8") if path.is_file() else None
        original(*args, **kwargs)
        if trainer.is_world_process_zero():
            restore_model_card_section(
                trainer.args.output_dir,
                previous,
                settings=compression_settings(trainer.args, trainer.callback_handler.callbacks),
                base_model=hub_name(trainer.model),
            )

    trainer.create_model_card = create_model_card
    trainer._hf_compress_keeps_card = True


class CompressionReportCallback(TrainerCallback):
    """Logs the trained model's size figures at evaluation time and writes them into the saved model card.

    At every evaluation, `<prefix>_parameters`, `<prefix>_nonzero_parameters`, `<prefix>_sparsity_model` (zeros
    among all parameters, embeddings and heads included; [`PruningCallback`]'s `sparsity_targeted` counts only the
    pruned layers), `<prefix>_size_mb` and `<prefix>_bits_per_parameter` are added to the evaluation metrics (`prefix` is the
    metric prefix, `eval` by default): they appear in the dict `trainer.evaluate()` returns, in
    `state.log_history` (so in `trainer_state.json`) and in the logs of the callbacks that run after this one (the
    progress bar / printer). Integrations registered before it (TensorBoard, W&B through `report_to`) get the
    figures from `log_history` rather than live. Sizes here are the state dict's tensor bytes; at `on_save` the real
    safetensors files of the checkpoint are measured. On save (`checkpoint-*/README.md`) and at the end of training
    (`output_dir/README.md`), the figures and the methods applied are written into the model card on the main
    process; an existing README is kept and only the hf_compress section is replaced.

    Args:
        methods (`list[str]`, *optional*): the methods applied, as they should read in the model card; by default
            inferred (distillation settings from a `DistillationConfig`, sparsity, quantization config).
        reference (`dict`, *optional*): figures of the reference model (`{"name": "teacher", "size_mb": 14.2}`),
            giving an "x smaller" line in the card.

    >>> from hf_compress import CompressionReportCallback
    >>> callback = CompressionReportCallback(methods=["distillation from bert-base (T=2, alpha=0.5)"])
    """

    def __init__(self, methods: Sequence[str] | None = None, reference: Mapping[str, Any] | None = None):
        if methods is not None and (isinstance(methods, str) or not all(isinstance(m, str) for m in methods)):
            raise ValueError(f"methods={methods!r} must be a list of strings.")
        self.methods = list(methods) if methods is not None else None
        self.reference = dict(reference) if reference else None
        self.last_figures: dict[str, Any] | None = None

    @staticmethod
    def _prefix(logs: Mapping[str, Any]) -> str | None:
        for key in logs:
            if key.endswith("_runtime") and not key.startswith("train"):
                return key[: -len("_runtime")]
        return None

    def _figures(self, model: nn.Module | None, disk: int | None = None) -> dict[str, Any] | None:
        if model is None:
            return None
        self.last_figures = size_figures(model, disk)
        return self.last_figures

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        figures = self._figures(model)
        if figures is None or metrics is None:
            return
        prefix = self._prefix(metrics) or "eval"
        metrics.update(_log_names(prefix, figures))

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs:
            return
        prefix = self._prefix(logs)
        if prefix is None:
            return
        figures = self._figures(model)
        if figures is None:
            return
        extra = _log_names(prefix, figures)
        logs.update(extra)
        # The Trainer appended a copy of these logs to log_history just before calling on_log.
        if state.log_history and all(state.log_history[-1].get(k) == v for k, v in logs.items() if k not in extra):
            state.log_history[-1].update(extra)

    def on_train_begin(self, args, state, control, **kwargs):
        self._find_trainer()

    def on_push_begin(self, args, state, control, **kwargs):
        self._find_trainer()

    def _find_trainer(self) -> None:
        # The trainer's other callbacks give the settings in the card, and push_to_hub must keep the card's section.
        trainer = dispatching_trainer(self, max_depth=10)
        if trainer is not None:
            self._trainer = trainer
            keep_compression_card_on_push(trainer)

    def _write(self, args, state, model, folder: Path, measure_files: bool) -> None:
        if not state.is_world_process_zero or model is None:
            return
        disk = None
        if measure_files and folder.is_dir():
            try:
                disk = disk_bytes(folder)
            except FileNotFoundError:
                disk = None
        figures = size_figures(model, disk)
        methods = self.methods if self.methods is not None else _default_methods(args, model, figures)
        trainer = getattr(self, "_trainer", None)
        settings = compression_settings(args, trainer.callback_handler.callbacks if trainer is not None else ())
        write_model_card(folder, figures, methods, self.reference, settings=settings, base_model=hub_name(model))

    def on_save(self, args, state, control, model=None, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            self._write(args, state, model, folder, measure_files=True)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write(args, state, model, Path(args.output_dir), measure_files=True)


__all__ = ["CompressionReportCallback", "compression_settings", "hub_name", "keep_compression_card_on_push"]
