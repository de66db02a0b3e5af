"""Trainer callbacks for quantization: quantization-aware training and post-training quantization with evaluation."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from ..utils import require_backend, unwrap_model
from ..utils.callbacks import dispatching_trainer
from ..utils.output import check_output_dir
from ..utils.reliability import check_finite_weights, ensure_callback_state_slot, honour_ddp_timeout
from ..utils.sharding import is_sharded, single_process_loading, unsharded_cpu_copy
from ..utils.validation import (
    check_bool,
    check_callable,
    check_int,
    check_output_folder,
    check_path,
    check_writable_folder,
    is_integer,
)
from .config import QATConfig
from .ptq import PTQ_METHODS, build_quantization_config, check_quantizable, quantize_model
from .qat import fake_quantized_module_names, prepare_qat_, save_qat_model, select_qat_modules

logger = logging.get_logger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _resolve_dir(base: str, output_dir: str | os.PathLike | None, default: str) -> Path:
    """`None` -> `<base>/<default>`; a relative path -> under `<base>`; an absolute path as given."""
    if output_dir is None:
        return Path(base) / default
    path = Path(output_dir)
    return path if path.is_absolute() else Path(base) / path


def checkpoint_weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weight files (`*.safetensors`, `*.bin`) directly inside a saved checkpoint folder."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))


class QATCallback(TrainerCallback, ExportableState):
    """Quantization-aware training inside an ordinary `Trainer` run, on torchao's fake quantization.

    The model trains in full precision until `start_step`; then the targeted `nn.Linear` layers become torchao
    `FakeQuantizedLinear` layers (sharing the same weight `Parameter`s, so the optimizer and its state are
    untouched), and training continues with the quantization error in the forward pass (straight-through gradients).
    At the end of training the fake quantization is removed (`trainer.model` is left with the QAT-trained float
    weights, so `trainer.save_model()` writes an ordinary checkpoint) and the real quantized model is written with
    [`save_qat_model`] to `output_dir`, where stock `from_pretrained` loads it.

    The schedule survives `resume_from_checkpoint`: the callback's arguments are stored in the checkpoint and, when
    training resumes at or past `start_step`, fake quantization is re-inserted in `on_train_begin` before the first
    resumed step (the checkpoint holds plain weights, and the optimizer state belongs to the same `Parameter`s). With
    `restore_callback_states_from_checkpoint=True` the Trainer replaces this callback object by one rebuilt from the
    checkpoint: look it up in `trainer.callback_handler.callbacks` rather than keeping a reference.

    Works unchanged inside [`DistillationTrainer`] (quantization-aware distillation: the student trains with fake
    quantization while matching the teacher).

    Logs, with every training log: `qat_enabled` (1 once fake quantization is active), `qat_layers` (fake-quantized
    Linear layers), `qat_weight_bits` (4 or 8), `qat_activation_bits` (8 for the dynamic-activation schemes, 0 for
    weight-only) and `qat_group_size` (0: one scale per output channel). Numbers only, so TensorBoard and W&B take
    them; the scheme's name is in the log line written when fake quantization is inserted.

    Args:
        scheme (`str`, *optional*, defaults to `"int8-dynamic-activation-int4-weight"`): see [`QATConfig`].
        group_size (`int`, *optional*): see [`QATConfig`]; must divide every targeted layer's `in_features`.
        start_step (`int`, *optional*, defaults to 0): optimizer step after which fake quantization is inserted
            (0: from the first step). Must be smaller than the run's `max_steps`.
        target_modules (`str` or `list[str]`, *optional*): PEFT-style names/regexes of the Linear layers to quantize.
        exclude_modules (`str` or `list[str]`, *optional*): names/regexes left in full precision.
        output_dir (`str`, *optional*): where the quantized model is written; a relative path is taken under
            `args.output_dir`. Defaults to `<args.output_dir>/quantized`.
        save_quantized (`bool`, *optional*, defaults to `True`): write the quantized model at the end of training.
        overwrite (`bool`, *optional*, defaults to `False`): allow writing into a non-empty quantized `output_dir`
            (checked before the first training step).

    Example:

    ```python
    >>> from hf_compress import QATCallback
    >>> qat = QATCallback(scheme="int8-dynamic-activation-int4-weight", group_size=32, start_step=100)
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[qat])  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> # <args.output_dir>/quantized now holds the int4 model: AutoModelForCausalLM.from_pretrained(...) loads it
    ```
    """

    def __init__(
        self,
        scheme: str = "int8-dynamic-activation-int4-weight",
        group_size: int | None = None,
        start_step: int = 0,
        target_modules: str | list[str] | None = None,
        exclude_modules: str | list[str] | None = None,
        output_dir: str | None = None,
        save_quantized: bool = True,
        overwrite: bool = False,
    ):
        require_backend("torchao", "QATCallback (quantization-aware training)")
        self.config = QATConfig(
            scheme=scheme, group_size=group_size, target_modules=target_modules, exclude_modules=exclude_modules
        )
        if is_integer(start_step) and start_step < 0:
            raise ValueError(
                f"start_step={start_step!r} must be an integer >= 0 (0 inserts fake quantization at once)."
            )
        self.start_step = check_int("start_step", start_step, low=0)
        self.output_dir = check_output_folder("output_dir", output_dir)
        self.save_quantized = check_bool("save_quantized", save_quantized)
        self.overwrite = check_bool("overwrite", overwrite)
        self._group_size_arg = group_size
        self.fake_quant_inserted_at: int | None = None
        self.fake_quantized_modules: list[str] = []
        self.quantized_model_dir: str | None = None

    # ExportableState: what `resume_from_checkpoint` needs to rebuild this callback.
    def state(self) -> dict:
        return {
            "args": {
                "scheme": self.config.scheme,
                "group_size": self._group_size_arg,
                "start_step": self.start_step,
                "target_modules": self.config.target_modules,
                "exclude_modules": self.config.exclude_modules,
                "output_dir": self.output_dir,
                "save_quantized": self.save_quantized,
                "overwrite": self.overwrite,
            },
            "attributes": {"fake_quant_inserted_at": self.fake_quant_inserted_at},
        }

    def _insert(self, model, step: int) -> None:
        # Fake quantization of a NaN/inf weight gives NaN scales for its whole group: stop with the layer's name.
        check_finite_weights(select_qat_modules(unwrap_model(model), self.config), "QATCallback", step)
        with torch.no_grad():
            self.fake_quantized_modules = prepare_qat_(unwrap_model(model), self.config)
        if self.fake_quant_inserted_at is None:
            self.fake_quant_inserted_at = step
        logger.info(
            f"QATCallback: step {step}: fake quantization ({self.config.scheme}, group_size={self.config.group_size}) "
            f"active on {len(self.fake_quantized_modules)} Linear layers."
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        max_steps = state.max_steps if state.max_steps and state.max_steps > 0 else args.max_steps
        if max_steps is not None and max_steps > 0 and self.start_step >= max_steps:
            raise ValueError(
                f"start_step={self.start_step} must be smaller than the run's max_steps={max_steps}: fake "
                "quantization would never be trained. Lower start_step or train longer."
            )
        select_qat_modules(unwrap_model(model), self.config)  # scheme/group-size/target errors before any step
        ensure_callback_state_slot(state, self)  # a resumed checkpoint without this callback must still save
        honour_ddp_timeout(args)
        if self.save_quantized and state.is_world_process_zero:
            target = _resolve_dir(args.output_dir, self.output_dir, "quantized")
            check_writable_folder("QATCallback output_dir", target)  # fails now, not after the last step
            # refuses a non-empty folder now, before any step, rather than after the last one
            check_output_dir(target, self.overwrite)
        if state.global_step >= self.start_step:
            # start_step=0, or a resumed run already past start_step: the checkpoint holds plain Linear weights.
            self._insert(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not fake_quantized_module_names(model) and state.global_step >= self.start_step:
            self._insert(model, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or any(k.startswith(("eval_", "test_")) for k in logs):
            return
        active = self.fake_quant_inserted_at is not None and state.global_step >= self.start_step
        values = {
            "qat_enabled": int(active),
            "qat_layers": len(self.fake_quantized_modules) if active else 0,
            "qat_weight_bits": self.config.weight_bits,
            "qat_activation_bits": 8 if self.config.quantizes_activations else 0,
            "qat_group_size": self.config.group_size or 0,
        }
        logs.update(values)
        # The Trainer appended the logs to log_history before calling callbacks; keep the history complete.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        model = unwrap_model(model)
        names = list(self.fake_quantized_modules or fake_quantized_module_names(model))
        if fake_quantized_module_names(model):
            from .qat import convert_qat_

            convert_qat_(model)  # every rank: plain Linear layers holding the QAT-trained weights
        if not self.save_quantized:
            return
        sharded = is_sharded(model)
        if sharded:
            # FSDP2 shards / ZeRO-3 partitions: gather a whole CPU copy on the main process (every rank takes part).
            model = unsharded_cpu_copy(model)
        if not state.is_world_process_zero:
            return
        check_finite_weights(
            select_qat_modules(model, self.config), "QATCallback (saving the quantized model)", state.global_step
        )
        target = _resolve_dir(args.output_dir, self.output_dir, "quantized")
        to_save = model
        if hasattr(model, "peft_config") and hasattr(model, "merge_and_unload"):
            # A LoRA student: quantize the merged weights (a copy, so the trained adapter stays as it is).
            to_save = (model if sharded else copy.deepcopy(model)).merge_and_unload()
            names = [_merged_module_name(n) for n in names]
        # Under ZeRO-3 the Trainer's DeepSpeed config would make from_pretrained a collective: load in this process.
        with single_process_loading():
            save_qat_model(
                to_save,
                target,
                self.config,
                processing_class=processing_class,
                overwrite=self.overwrite,
                quantized_module_names=names or None,
            )
        self.quantized_model_dir = str(target)
        logger.info(f"QATCallback: wrote the {self.config.scheme} quantized model to {target}.")


def _merged_module_name(peft_name: str) -> str:
    """`base_model.model.model.layers.0.q_proj.base_layer` -> `model.layers.0.q_proj` (the name after merging)."""
    name = peft_name.removeprefix("base_model.model.")
    return name.removesuffix(".base_layer")


def evaluate_model(
    model: torch.nn.Module,
    dataloader,
    *,
    compute_metrics: Callable | None = None,
    preprocess_logits_for_metrics: Callable | None = None,
    label_names: list[str] | None = None,
    metric_key_prefix: str = "eval",
) -> dict[str, float]:
    """Run `model` over `dataloader` and return `{prefix}_loss` plus `compute_metrics` results, Trainer-style.

    Hand-written because `Trainer.evaluate` refuses purely quantized (bitsandbytes) models; it mirrors the
    Trainer's loop: the loss is averaged over samples, logits and labels are concatenated (padded with -100 across
    batches of different lengths) and passed to `compute_metrics` as an `EvalPrediction`.
    """
    from transformers import EvalPrediction
    from transformers.trainer_pt_utils import nested_concat

    label_names = label_names or ["labels"]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, total_samples = 0.0, 0
    all_logits = all_labels = None
    with torch.no_grad():
        for batch in dataloader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            outputs = model(**batch)
            n = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
            if getattr(outputs, "loss", None) is not None:
                total_loss += float(outputs.loss.float()) * n
                total_samples += n
            if compute_metrics is None:
                continue
            logits = outputs.logits.float().cpu()
            labels = (
                batch[label_names[0]].cpu() if len(label_names) == 1 else tuple(batch[k].cpu() for k in label_names)
            )
            if preprocess_logits_for_metrics is not None:
                logits = preprocess_logits_for_metrics(logits, labels)
            all_logits = logits if all_logits is None else nested_concat(all_logits, logits, padding_index=-100)
            all_labels = labels if all_labels is None else nested_concat(all_labels, labels, padding_index=-100)
    model.train(was_training)
    metrics: dict[str, float] = {}
    if total_samples:
        metrics[f"{metric_key_prefix}_loss"] = total_loss / total_samples
    if compute_metrics is not None and all_logits is not None:
        as_numpy = lambda t: t.numpy() if isinstance(t, torch.Tensor) else tuple(x.numpy() for x in t)  # noqa: E731
        computed = compute_metrics(EvalPrediction(predictions=as_numpy(all_logits), label_ids=as_numpy(all_labels)))
        for key, value in computed.items():
            key = key if key.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{key}"
            metrics[key] = float(value) if isinstance(value, (int, float)) or hasattr(value, "item") else value
    return metrics


class PostTrainingQuantizationCallback(TrainerCallback):
    """Quantize the trained model at the end of the run, evaluate it next to the full-precision one, save both.

    At `on_train_end` (main process): the full-precision model is saved to `args.output_dir` (as
    `trainer.save_model()` would), a quantized copy is made with [`quantize_model`] (the trained model is left
    untouched), saved to `<args.output_dir>/<prefix>`, and both models are evaluated on the evaluation set with the
    trainer's `compute_metrics`. The metrics (`eval_*` for full precision, `<prefix>_*` for the quantized copy), the
    memory footprints and the weight bytes on disk of both are logged (`trainer.log` when the trainer is bound,
    else appended to `state.log_history`) and kept in `self.metrics`.

    Evaluation uses the trainer's eval dataset, collator, `compute_metrics` and `preprocess_logits_for_metrics`.
    Callbacks do not receive the trainer, so in `on_train_begin` the callback takes the Trainer that dispatches the
    event to it (`Trainer(..., callbacks=[PostTrainingQuantizationCallback("nf4")])` just works); `trainer=` or
    `callback.bind(trainer)` set it explicitly. Without a trainer, a run that evaluated during training
    (`eval_strategy` not `"no"`) has its eval dataloader reused with the `compute_metrics` given here.

    Checked in `on_train_begin`, before any step: the model can be quantized (a PEFT model on a full-precision base
    is merged into a copy; one on a 4-bit base is an error pointing to [`merge_qlora`]) and evaluation data exists.

    Args:
        method (`str`, *optional*, defaults to `"nf4"`): see [`quantize_model`]: `"nf4"`, `"fp4"`, `"int8"`
            (bitsandbytes), `"torchao-int8"`, `"torchao-int4"`.
        prefix (`str`, *optional*): metric prefix and sub-folder name; defaults to `"ptq_<method>"` (with `-` as `_`).
        compute_metrics (`Callable`, *optional*): used when the trainer is not bound.
        evaluate (`bool`, *optional*, defaults to `True`): evaluate both models.
        save_full_precision (`bool`, *optional*, defaults to `True`): save the trained model to `args.output_dir`.
        trainer (`Trainer`, *optional*): the trainer, for its eval set and `compute_metrics`.
        **quantize_kwargs: passed to [`quantize_model`] (`compute_dtype`, `double_quant`, `llm_int8_threshold`,
            `group_size`, `skip_modules`).

    Example:

    ```python
    >>> from hf_compress import PostTrainingQuantizationCallback
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
    ...                   compute_metrics=compute_metrics,
    ...                   callbacks=[PostTrainingQuantizationCallback("nf4")])  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> # logs eval_accuracy and ptq_nf4_accuracy; <output_dir>/ptq_nf4 loads with from_pretrained
    ```
    """

    def __init__(
        self,
        method: str = "nf4",
        prefix: str | None = None,
        compute_metrics: Callable | None = None,
        evaluate: bool = True,
        save_full_precision: bool = True,
        trainer=None,
        **quantize_kwargs: Any,
    ):
        allowed = {"compute_dtype", "double_quant", "llm_int8_threshold", "group_size", "skip_modules"}
        unknown = sorted(set(quantize_kwargs) - allowed)
        if unknown:
            raise ValueError(f"Unknown quantization options {unknown}; allowed: {sorted(allowed)}.")
        # Validates the method (with a did-you-mean), its backend (install hint) and the option values now.
        build_quantization_config(method, **quantize_kwargs)
        self.method = method
        check_path("prefix", prefix)
        self.prefix = prefix or "ptq_" + method.replace("-", "_")
        if not self.prefix.isidentifier():
            raise ValueError(f"prefix={self.prefix!r} must be a plain name (letters, digits, underscores).")
        self.compute_metrics = check_callable("compute_metrics", compute_metrics)
        self.evaluate = check_bool("evaluate", evaluate)
        self.save_full_precision = check_bool("save_full_precision", save_full_precision)
        self.quantize_kwargs = quantize_kwargs
        self.trainer = trainer
        self.metrics: dict[str, Any] = {}
        self.quantized_model_dir: str | None = None

    def bind(self, trainer) -> PostTrainingQuantizationCallback:
        """Give the callback the trainer whose eval set, collator and `compute_metrics` it uses. Returns `self`."""
        self.trainer = trainer
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # Everything that would fail after training fails now: a model quantize_model cannot take (a PEFT model on a
        # 4-bit base, a model already quantized, not a transformers model), an unwritable output folder and missing
        # evaluation data.
        if state.is_world_process_zero:  # where on_train_end writes
            check_writable_folder("output_dir", Path(args.output_dir) / self.prefix)
        if model is not None:
            check_quantizable(model, "model")
        if self.trainer is None:
            # passed as `callbacks=[...]`: the Trainer dispatching this event gives its eval set and compute_metrics
            self.trainer = dispatching_trainer(self)
        if not self.evaluate:
            return
        if self.trainer is not None:
            if self.trainer.eval_dataset is None:
                raise ValueError(
                    "PostTrainingQuantizationCallback(evaluate=True) evaluates both models on the trainer's "
                    "eval_dataset, which is None: pass eval_dataset= to the trainer, or evaluate=False."
                )
            return
        if str(getattr(args, "eval_strategy", "no")) in ("no", "IntervalStrategy.NO"):
            raise ValueError(
                "PostTrainingQuantizationCallback(evaluate=True) needs evaluation data but cannot see the trainer: "
                "pass trainer=trainer (trainer.add_callback(PostTrainingQuantizationCallback(..., trainer=trainer))), "
                "call callback.bind(trainer), set eval_strategy so the trainer evaluates during training, or pass "
                "evaluate=False."
            )

    def _eval_inputs(self, kwargs) -> tuple[Any, Callable | None, Callable | None, list[str] | None]:
        trainer = self.trainer
        if trainer is not None:
            if trainer.eval_dataset is None:
                return None, None, None, None
            return (
                trainer.get_eval_dataloader(),
                trainer.compute_metrics,
                trainer.preprocess_logits_for_metrics,
                trainer.label_names,
            )
        return kwargs.get("eval_dataloader"), self.compute_metrics, None, None

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero:
            return
        model = unwrap_model(model)
        output_dir = Path(args.output_dir)
        quantized_dir = output_dir / self.prefix
        logs: dict[str, Any] = {}

        if self.save_full_precision:
            model.save_pretrained(output_dir)
            if processing_class is not None:
                processing_class.save_pretrained(output_dir)
            logs["full_precision_disk_bytes"] = checkpoint_weight_bytes(output_dir)
        logs["full_precision_memory_footprint_bytes"] = model.get_memory_footprint()

        quantized = quantize_model(
            model,
            self.method,
            output_dir=quantized_dir,
            processing_class=processing_class,
            overwrite=True,  # the folder belongs to this run, like the Trainer's own output files
            **self.quantize_kwargs,
        )
        self.quantized_model_dir = str(quantized_dir)
        logs[f"{self.prefix}_disk_bytes"] = checkpoint_weight_bytes(quantized_dir)
        logs[f"{self.prefix}_memory_footprint_bytes"] = quantized.get_memory_footprint()

        if self.evaluate:
            dataloader, compute_metrics, preprocess, label_names = self._eval_inputs(kwargs)
            if dataloader is None:
                logger.warning("PostTrainingQuantizationCallback: no evaluation data found; metrics not computed.")
            else:
                for prefix, candidate in (("eval", model), (self.prefix, quantized)):
                    logs.update(
                        evaluate_model(
                            candidate,
                            dataloader,
                            compute_metrics=compute_metrics,
                            preprocess_logits_for_metrics=preprocess,
                            label_names=label_names,
                            metric_key_prefix=prefix,
                        )
                    )
                is_causal_lm = type(model).__name__.endswith("ForCausalLM")
                for prefix in ("eval", self.prefix):
                    if is_causal_lm and f"{prefix}_loss" in logs and logs[f"{prefix}_loss"] < 50:
                        logs[f"{prefix}_perplexity"] = math.exp(logs[f"{prefix}_loss"])
        del quantized
        self.metrics = dict(logs)
        summary = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
        logger.info(f"PostTrainingQuantizationCallback ({self.method}): {summary}")
        if self.trainer is not None:
            self.trainer.log(copy.copy(logs))
        else:
            state.log_history.append({**logs, "step": state.global_step})


__all__ = [
    "PTQ_METHODS",
    "PostTrainingQuantizationCallback",
    "QATCallback",
    "checkpoint_weight_bytes",
    "evaluate_model",
]
