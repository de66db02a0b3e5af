"""`DistillationTrainer`: a drop-in `Trainer` whose loss mixes the task loss with matching a frozen teacher."""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from ..utils.checkpoints import CorruptCheckpointError, checkpoint_problems, last_complete_checkpoint
from ..utils.modules import unwrap_model
from ..utils.reliability import NonFiniteError, honour_ddp_timeout
from ..utils.validation import check_writable_folder
from .cache import CACHE_COLUMNS, COLUMN_CONFIG, CachedTargetsSpec
from .config import DistillationConfig
from .guard import (
    ID_INPUTS,
    bad_parts,
    describe_nonfinite_tensor,
    describe_out_of_range,
    loss_flags,
    prepare_batch_checks,
    raise_or_warn,
)
from .lm_head import HeadInputCapture, UnsupportedHead, find_output_head, head_parameters, logits_match
from .losses import (
    distillation_loss,
    fused_forward_kl_and_cross_entropy,
    fused_linear_distillation_loss,
    hidden_state_loss,
)
from .offline import (
    BATCH_IDS,
    BATCH_NEG_ENTROPY,
    BATCH_PROBS,
    BATCH_REST,
    CachedTargetsCollator,
    cached_targets_spec,
    check_cached_rows,
    check_spec_for_training,
)
from .offline import BATCH_KEYS as CACHED_BATCH_KEYS
from .sparse_losses import sparse_distillation_loss, sparse_forward_kl_and_cross_entropy

logger = logging.get_logger(__name__)

PROJECTOR_FILE = "distillation_projector.pt"
_UNSET = object()


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / compile / PEFT wrappers."""
    model = unwrap_model(model)
    get_base = getattr(model, "get_base_model", None)  # PEFT
    return get_base() if callable(get_base) else model


def infer_task(model: nn.Module) -> str:
    """`sequence-classification`, `causal-lm` or `token-classification`, from the model's class name."""
    name = type(_base_model(model)).__name__
    if name.endswith("ForSequenceClassification"):
        return "sequence-classification"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if name.endswith("ForTokenClassification"):
        return "token-classification"
    raise ValueError(
        f"task='auto' cannot tell what {name} predicts; set DistillationConfig.task to one of "
        "'sequence-classification', 'causal-lm' or 'token-classification'."
    )


def _check_task_matches_model(task: str, model: nn.Module) -> None:
    """A task the student's class contradicts (e.g. `causal-lm` for a classifier) fails here, not at step 1."""
    if task == "auto":
        return
    try:
        inferred = infer_task(model)
    except ValueError:  # a class whose name says nothing: the task is the user's word
        return
    if inferred != task:
        raise ValueError(
            f"task={task!r} does not match the student {type(_base_model(model)).__name__}, a {inferred} model: "
            f"set task={inferred!r} or task='auto'."
        )


def _output_width(model: nn.Module, task: str) -> int | None:
    """Number of logits per position: classes for classifiers, (padded) vocabulary rows for LMs."""
    base = _base_model(model)
    config = getattr(base, "config", None)
    if task in ("sequence-classification", "token-classification"):
        return getattr(config, "num_labels", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2 and getattr(weight, "quant_state", None) is None:
        return int(weight.shape[0])
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "vocab_size", None)


def _num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(_base_model(model), "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layers", "n_layer"):
        if getattr(config, key, None) is not None:
            return int(getattr(config, key))
    return None


def _hidden_width(model: nn.Module) -> int | None:
    config = getattr(_base_model(model), "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("hidden_size", "dim", "n_embd", "d_model"):
        if getattr(config, key, None) is not None:
            return int(getattr(config, key))
    return None


def _input_vocabulary(model: nn.Module) -> int | None:
    """Rows of the input embedding table (ids at or above it cannot be looked up), or None if unknown."""
    get = getattr(_base_model(model), "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        embeddings = None
    rows = getattr(embeddings, "num_embeddings", None)
    return int(rows) if rows else None


class _CachedTargetsCheck:
    """Refuses cached targets the run cannot use (picklable, so dataloader workers can run it on each new setting)."""

    def __init__(self, **settings: Any):
        self.settings = settings
        self.shared_width: int | None | str = "unset"  # the train set's, once checked

    def __call__(self, spec: CachedTargetsSpec, name: str = "a batch") -> int | None:
        width = check_spec_for_training(spec, name=name, **self.settings)
        if self.shared_width != "unset" and width != self.shared_width:
            raise ValueError(
                f"{name}: cached teacher targets over {spec.vocab_size} tokens, but the train set's cover "
                f"{self.shared_width}."
            )
        return width


def _is_iterable_dataset(dataset) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        return False
    return isinstance(dataset, datasets.IterableDataset)


def default_layer_mapping(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Teacher layer (1-based) for each student layer, evenly spaced: round(i * T / S) for i = 1..S."""
    return [max(1, round(i * num_teacher_layers / num_student_layers)) for i in range(1, num_student_layers + 1)]


class _SyncProjectorGradients:
    """Averages the hidden-state projector's gradients across ranks before each optimizer step.

    The projector lives outside the student (so it is never saved with it), hence outside DDP's gradient hooks.
    """

    def __init__(self, trainer: DistillationTrainer):
        self.trainer = trainer

    def __call__(self) -> None:
        projector = self.trainer.hidden_projector
        if projector is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        world = torch.distributed.get_world_size()
        if world == 1:
            return
        for p in projector.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world)


class DistillationTrainer(Trainer):
    r"""
    A [`~transformers.Trainer`] that distills a frozen teacher into the student it trains.

    Every `Trainer` argument works unchanged (datasets, collator, `compute_metrics`, callbacks,
    `processing_class`, a PEFT student, `optimizers`); the only addition is `teacher_model`. With
    `teacher_model=None` the student trains from teacher targets cached in the dataset by `cache_teacher_logits`
    (offline distillation: no teacher in memory or in the step). The loss is
    `alpha * distillation + (1 - alpha) * task (+ hidden_loss_weight * hidden)`, with the parts logged separately
    as `loss_distill`, `loss_task` and `loss_hidden`. At evaluation `eval_loss` is that combined loss (what
    `metric_for_best_model="eval_loss"` compares); `eval_loss_task` is the task loss alone (cross-entropy on the
    labels, logged even with `alpha=1`), the figure comparable with a plain `Trainer`'s `eval_loss`.

    Like `Trainer.train()`, `train()` writes checkpoints but not the final model: call `trainer.save_model()` (to
    `args.output_dir`) before loading it elsewhere, e.g. with `quantize_model(args.output_dir)`. `push_to_hub()`
    writes a model card that keeps the hf_compress section and lists the distillation settings (temperature,
    alpha, loss_type, ...).

    The teacher is kept in `eval()` with no gradients, is never wrapped in DDP, is placed by the accelerator
    (sharded under FSDP2, a ZeRO-3 inference engine under DeepSpeed ZeRO-3), and is never saved into the student's
    checkpoints.

    Args:
        model (`PreTrainedModel` or `peft.PeftModel`): the student.
        teacher_model (`PreTrainedModel`, `nn.Module`, `str` or `None`):
            the teacher, or a name/path loaded with `args.teacher_model_init_kwargs` and the student's task class;
            `None` to train from the cached targets that `train_dataset` carries (see `cache_teacher_logits`).
        args (`DistillationConfig`, *optional*): a plain `TrainingArguments` is converted with default
            distillation settings.
        **kwargs: every other `Trainer` argument.

    >>> from hf_compress import DistillationConfig, DistillationTrainer
    >>> trainer = DistillationTrainer(
    ...     model=student, teacher_model=teacher, args=DistillationConfig(output_dir="out"), train_dataset=train
    ... )  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | None = None,
        args: DistillationConfig | TrainingArguments | None = None,
        **kwargs: Any,
    ):
        if model is None:
            raise ValueError("model: DistillationTrainer needs a student model.")
        if args is None:
            args = DistillationConfig(output_dir="tmp_trainer")
        elif not isinstance(args, DistillationConfig):
            logger.info("Converting %s to DistillationConfig with default distillation settings.", type(args).__name__)
            values = {f.name: getattr(args, f.name) for f in fields(args) if f.init}
            args = DistillationConfig(**values)
        self.task = args.task if args.task != "auto" else infer_task(model)
        _check_task_matches_model(args.task, model)
        self._cached_targets = None  # the CachedTargetsSpec of the train dataset when training offline
        if teacher_model is None:
            self._cached_targets = self._check_cached_targets(model, args, kwargs)
        if isinstance(teacher_model, (str, os.PathLike)):
            teacher_model = self._load_teacher(str(teacher_model), args.teacher_model_init_kwargs or {})
        elif args.teacher_model_init_kwargs:
            logger.warning("teacher_model_init_kwargs is ignored: the teacher was passed as a loaded model.")
        if self._cached_targets is None and not isinstance(teacher_model, nn.Module):
            raise TypeError(f"teacher_model must be an nn.Module or a name/path, got {type(teacher_model).__name__}.")
        if self._cached_targets is None:
            self._check_compatible(model, teacher_model, kwargs.get("processing_class"))

        super().__init__(model=model, args=args, **kwargs)

        # The loss below is normalised by the item count of the whole accumulated batch when the Trainer provides
        # it, so ask the Trainer to count items whatever the student's forward signature.
        self.model_accepts_loss_kwargs = True
        if self.task == "causal-lm":
            self._loss_shifts_labels = True

        if self._cached_targets is not None:
            self._setup_cached_targets()
        else:
            teacher_model.eval()
            teacher_model.requires_grad_(False)
            self.teacher_model = self._prepare_teacher(teacher_model)

        self.hidden_projector: nn.ModuleList | None = None
        self._layer_mapping: list[int] | None = None
        if args.hidden_loss_weight > 0:
            self._setup_hidden_distillation(model, teacher_model)
        self._loss_parts: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._setup_batch_guard(model, teacher_model)
        _log_compression_figures_before_integrations(self.callback_handler)
        self._hf_compress_keeps_card = True  # create_model_card below; CompressionReportCallback need not wrap it

    # ------------------------------------------------------------------ setup
    def _load_teacher(self, name_or_path: str, init_kwargs: dict[str, Any]) -> PreTrainedModel:
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoModelForTokenClassification,
        )

        if not os.path.exists(os.path.expanduser(name_or_path)) and (
            name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
        ):
            raise ValueError(f"teacher_model: the path {name_or_path!r} does not exist.")
        auto_class = {
            "sequence-classification": AutoModelForSequenceClassification,
            "causal-lm": AutoModelForCausalLM,
            "token-classification": AutoModelForTokenClassification,
        }[self.task]
        init_kwargs = dict(init_kwargs)
        dtype = init_kwargs.get("dtype", init_kwargs.get("torch_dtype"))
        if isinstance(dtype, str) and dtype != "auto":
            init_kwargs["dtype"] = getattr(torch, dtype)
            init_kwargs.pop("torch_dtype", None)
        try:
            from ..utils.loading import load_pretrained

            # load_pretrained: a `.gguf` path or `gguf_file` in init_kwargs loads dequantized (utils/loading.py).
            return load_pretrained(name_or_path, auto_class, **init_kwargs)
        except OSError as err:
            raise ValueError(
                f"teacher_model: cannot load {name_or_path!r}: it is not a local model directory and could not be "
                f"fetched from the Hub ({err.__class__.__name__}: {str(err).splitlines()[0]})."
            ) from err

    def _check_compatible(self, student: nn.Module, teacher: nn.Module, processing_class: Any) -> None:
        s_width, t_width = _output_width(student, self.task), _output_width(teacher, self.task)
        if s_width is None or t_width is None or s_width == t_width:
            self._shared_width = None
            return
        if self.task in ("sequence-classification", "token-classification"):
            raise ValueError(
                f"teacher_model predicts {t_width} classes but the student predicts {s_width}; distillation needs "
                "the same label set (num_labels and its order)."
            )
        # Causal LMs: widths may differ only because one embedding matrix is padded (e.g. 152064 vs 151936 rows);
        # then every real token id is below the smaller width, and the distributions are compared on that range.
        shared = min(s_width, t_width)
        vocab = (
            len(processing_class) if processing_class is not None and hasattr(processing_class, "__len__") else None
        )
        s_cfg, t_cfg = _base_model(student).config, _base_model(teacher).config
        same_specials = all(
            getattr(s_cfg, k, None) == getattr(t_cfg, k, None) for k in ("bos_token_id", "eos_token_id")
        )
        if vocab is None:
            raise ValueError(
                f"teacher_model has {t_width} output logits but the student has {s_width}. If the two share a "
                "tokenizer and only one embedding matrix is padded, pass that tokenizer as processing_class so the "
                "shared range can be checked; otherwise the vocabularies differ and cannot be distilled token-wise."
            )
        if vocab > shared or not same_specials:
            raise ValueError(
                f"teacher_model vocabulary ({t_width} logits) and student vocabulary ({s_width} logits) differ beyond "
                f"embedding padding (tokenizer has {vocab} tokens, special token ids "
                f"{'match' if same_specials else 'differ'}): the models use different tokenizers."
            )
        logger.info("Teacher and student logits differ only by padding; comparing the first %d.", shared)
        self._shared_width = shared

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        from accelerate.utils import DistributedType

        quantized = getattr(teacher, "is_loaded_in_4bit", False) or getattr(teacher, "is_loaded_in_8bit", False)
        placed = getattr(teacher, "hf_device_map", None) is not None
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            return _prepare_deepspeed_teacher(teacher, self.accelerator)
        if getattr(self.accelerator, "is_fsdp2", False) and not quantized:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            return fsdp2_prepare_model(self.accelerator, teacher)
        # evaluation_mode: device placement and mixed precision only, never a DDP wrapper.
        return self.accelerator.prepare_model(
            teacher, device_placement=not (quantized or placed), evaluation_mode=True
        )

    def _setup_hidden_distillation(self, student: nn.Module, teacher: nn.Module) -> None:
        s_layers, t_layers = _num_hidden_layers(student), _num_hidden_layers(teacher)
        if s_layers is None or t_layers is None:
            raise ValueError("hidden_loss_weight > 0 needs models whose config gives their number of layers.")
        mapping = self.args.hidden_layer_mapping or default_layer_mapping(s_layers, t_layers)
        if len(mapping) != s_layers:
            raise ValueError(
                f"hidden_layer_mapping={mapping} has {len(mapping)} entries but the student has {s_layers} layers."
            )
        if max(mapping) > t_layers:
            raise ValueError(f"hidden_layer_mapping={mapping} names a teacher layer above its {t_layers} layers.")
        self._layer_mapping = mapping
        s_width, t_width = _hidden_width(student), _hidden_width(teacher)
        if s_width is not None and t_width is not None and s_width != t_width:
            from accelerate.utils import DistributedType

            if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
                raise ValueError(
                    f"hidden_loss_weight > 0 with different widths (student {s_width}, teacher {t_width}) needs a "
                    "learned projection, which is not supported under DeepSpeed; use DDP/FSDP or equal widths."
                )
            # TinyBERT's learned W_h, one per distilled layer: student width -> teacher width.
            self.hidden_projector = nn.ModuleList(nn.Linear(s_width, t_width) for _ in mapping).to(self.args.device)
            self.add_callback(_ProjectorCallback(_SyncProjectorGradients(self)))

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.hidden_projector is not None and not any(
            p is q
            for group in optimizer.param_groups
            for p in group["params"]
            for q in self.hidden_projector.parameters()
        ):
            optimizer.add_param_group(
                {"params": list(self.hidden_projector.parameters()), "weight_decay": self.args.weight_decay}
            )
        return optimizer

    # ------------------------------------------------------------------ loss
    def _teacher_forward(self, inputs: dict[str, Any]) -> Any:
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            return self.teacher_model(**teacher_inputs, output_hidden_states=self.args.hidden_loss_weight > 0)

    def _positions(
        self, logits: torch.Tensor, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(mask, targets)` aligned with the logits' leading dimensions: which positions hold a distribution to
        distill (True = counts), and the label each position predicts (-100 = none)."""
        labels = inputs.get("labels")
        attention_mask = inputs.get("attention_mask")
        if self.task == "sequence-classification":
            return ((labels != -100) if labels is not None else None), labels
        if self.task == "causal-lm":
            # logits[:, t] predicts token t + 1. The labels are shifted (not the logits, which would copy them),
            # and the last position, which predicts nothing, is masked out.
            if labels is not None:
                targets = F.pad(labels[:, 1:], (0, 1), value=-100)
                mask = targets != -100
            else:
                targets = None
                mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
                mask[:, -1] = False
            if attention_mask is not None:
                mask = mask & F.pad(attention_mask[:, 1:], (0, 1), value=0).bool()
            return mask, targets
        mask = (labels != -100) if labels is not None else None
        if attention_mask is not None:
            mask = attention_mask.bool() if mask is None else mask & attention_mask.bool()
        return mask, labels

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation loss of a batch, behind the batch guard (`args.nonfinite`, see `_guarded_loss`)."""
        if not model.training or (self.args.nonfinite == "off" and self._guard_first_batch_done):
            return self._distillation_loss(model, inputs, return_outputs, num_items_in_batch)
        return self._guarded_loss(model, inputs, return_outputs, num_items_in_batch)

    def _distillation_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._cached_targets is not None:
            return self._compute_cached_targets_loss(model, inputs, return_outputs, num_items_in_batch)
        # Training steps take the fused LM-head path where it applies (the batch guard asks for outputs too: it
        # gets None and recomputes the student's logits only on its failure path); evaluation returns full logits.
        if (not return_outputs or model.training) and self._fused_lm_head_plan(model) is not None:
            loss = self._fused_lm_head_loss(model, inputs, num_items_in_batch)
            if loss is not None:  # None: this setup cannot use it (logged once); the materialised path follows
                return (loss, None) if return_outputs else loss
        args: DistillationConfig = self.args
        student_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        want_hidden = args.hidden_loss_weight > 0
        outputs = model(**student_inputs, output_hidden_states=want_hidden)
        teacher_outputs = self._teacher_forward(inputs)

        s_logits, t_logits = outputs.logits, teacher_outputs.logits.to(outputs.logits.device)
        if self._shared_width is not None:
            s_logits, t_logits = s_logits[..., : self._shared_width], t_logits[..., : self._shared_width]
        mask, targets = self._positions(s_logits, inputs)
        self._require_targets(targets)
        local_items, denominator = self._loss_normalisers(s_logits, mask, num_items_in_batch, model)

        means: dict[str, torch.Tensor] = {}
        if args.loss_type == "forward_kl":
            # The default: one fused pass computes both parts and their gradient (same values as the pure losses).
            total, sum_distill, sum_task = fused_forward_kl_and_cross_entropy(
                s_logits, t_logits, targets if args.alpha < 1.0 else None, args.temperature, args.alpha, mask
            )
            means["loss_distill"] = sum_distill / local_items
            if args.alpha < 1.0:
                means["loss_task"] = sum_task / local_items
        else:
            sum_distill = distillation_loss(
                s_logits, t_logits, args.loss_type, args.temperature, args.jsd_beta, mask, reduction="sum"
            )
            means["loss_distill"] = sum_distill / local_items
            total = args.alpha * sum_distill
            if args.alpha < 1.0:
                sum_task = self._task_loss(s_logits, targets, mask)
                means["loss_task"] = sum_task / local_items
                total = total + (1.0 - args.alpha) * sum_task
        if want_hidden:
            # A per-token mean over this micro-batch, weighted by its item count so it accumulates like the others.
            means["loss_hidden"] = self._hidden_loss(outputs, teacher_outputs, inputs.get("attention_mask"))
            total = total + args.hidden_loss_weight * means["loss_hidden"] * local_items
        loss = total / denominator
        if "loss_task" not in means and targets is not None and not model.training:
            # alpha=1 trains on the teacher alone, but evaluation still reports the task loss (`eval_loss_task`),
            # the figure comparable with a plain Trainer's eval_loss (eval_loss here is the combined loss).
            with torch.no_grad():
                means["loss_task"] = self._task_loss(s_logits, targets, mask) / local_items

        loss = self._record_loss_parts(model, loss, means, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _require_targets(self, targets) -> None:
        """The task loss (weight 1 - alpha) needs labels in the batch."""
        alpha = self.args.alpha
        if alpha < 1.0 and targets is None:
            raise ValueError(
                f"alpha={alpha} gives the task loss a weight of {1 - alpha}, but the batch has no "
                "'labels'. Add labels to the dataset or set alpha=1.0 for pure distillation."
            )

    def _loss_normalisers(self, logits, mask, num_items_in_batch, model) -> tuple[torch.Tensor, torch.Tensor]:
        """`(local_items, denominator)` of a batch's summed losses, shared by every loss path.

        Sums are divided by the item count of the whole accumulated batch (across devices when the Trainer averages
        tokens across devices), so gradient accumulation gives the same update as one large batch. Without that count
        (evaluation, unlabeled data) each micro-batch is a plain mean over its `local_items`."""
        if mask is not None:
            local_items = mask.sum().clamp_min(1)
        else:
            local_items = torch.tensor(max(1, logits.shape[:-1].numel()), device=logits.device)
        denominator = num_items_in_batch if (num_items_in_batch is not None and model.training) else local_items
        return local_items, denominator

    def _record_loss_parts(self, model, loss: torch.Tensor, means: dict[str, torch.Tensor], num_items_in_batch):
        """Keep the loss parts for `log()` (no host sync per step) and undo DDP's gradient average when the loss
        was divided by an item count summed over ranks; returns the loss to back-propagate."""
        mode = "train" if model.training else "eval"
        for key, value in means.items():
            self._loss_parts[mode][key].append(value.detach())
        self.loss_is_scaled_for_ga = num_items_in_batch is not None and model.training
        if self.loss_is_scaled_for_ga and self.args.average_tokens_across_devices and self.args.world_size > 1:
            # num_items_in_batch was summed over ranks and DDP averages gradients: undo the average.
            loss = loss * self.accelerator.num_processes
        return loss

    def _task_loss(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Summed cross-entropy of the student on the labels (the same positions as the distillation loss)."""
        if mask is not None:
            targets = targets.masked_fill(~mask, -100)
        return F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )

    def _hidden_loss(self, outputs, teacher_outputs, attention_mask) -> torch.Tensor:
        s_hidden, t_hidden = getattr(outputs, "hidden_states", None), getattr(teacher_outputs, "hidden_states", None)
        if s_hidden is None or t_hidden is None:
            which = "student" if s_hidden is None else "teacher"
            raise ValueError(
                f"hidden_loss_weight={self.args.hidden_loss_weight} needs hidden states, but the {which} returned none "
                "with output_hidden_states=True. Set hidden_loss_weight=0 for this model."
            )
        mask = attention_mask.bool() if attention_mask is not None else None
        total = 0.0
        for i, t_index in enumerate(self._layer_mapping):
            s_h = s_hidden[i + 1]
            t_h = t_hidden[t_index].to(s_h.device)
            if self.hidden_projector is not None:
                s_h = self.hidden_projector[i](s_h.to(self.hidden_projector[i].weight.dtype))
            total = total + hidden_state_loss(s_h, t_h, self.args.hidden_loss_type, mask, reduction="mean")
        return total / len(self._layer_mapping)

    # ------------------------------------------------------------------ fused LM-head loss (causal LMs)
    def _fused_lm_head_plan(self, model) -> tuple[Any, Any] | None:
        """`(student_head, teacher_head)` when the fused LM-head loss applies, else None (the reason logged once)."""
        plan = getattr(self, "_fused_lm_heads", _UNSET)
        if plan is not _UNSET:
            return plan
        plan = None
        if self.args.fused_lm_head_loss and self.task == "causal-lm":
            try:
                plan = self._find_fused_lm_heads(model)
            except UnsupportedHead as reason:
                self._disable_fused_lm_head(str(reason))
                return None
        self._fused_lm_heads = plan
        return plan

    def _find_fused_lm_heads(self, model) -> tuple[Any, Any]:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
            raise UnsupportedHead("DeepSpeed ZeRO-3 partitions the student's output head")
        return find_output_head(model), find_output_head(self.teacher_model)

    def _disable_fused_lm_head(self, reason: str) -> None:
        logger.warning(
            "fused_lm_head_loss: %s; using the materialised-logits loss for this run (same values, more memory).",
            reason,
        )
        self._fused_lm_heads = None

    def _fused_lm_head_loss(self, model, inputs, num_items_in_batch) -> torch.Tensor | None:
        """`compute_loss` for causal LMs without the full logits of either model.

        Both models run their own forward with a hook on the output head that keeps its input (the final hidden
        states) and lets it project only the last position; `fused_linear_distillation_loss` then builds the
        logits chunk by chunk. Same values, masks and normalisation as the materialised path. Returns None when the
        first step finds this model unsupported (the materialised path then runs, now and for the rest of the run).
        """
        args: DistillationConfig = self.args
        s_head, t_head = self._fused_lm_heads
        student_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        want_hidden = args.hidden_loss_weight > 0
        with HeadInputCapture(s_head.module) as s_cap:
            outputs = model(**student_inputs, output_hidden_states=want_hidden)
        with HeadInputCapture(t_head.module) as t_cap:
            teacher_outputs = self._teacher_forward(inputs)
        positions = inputs["input_ids"].shape[:2] if "input_ids" in inputs else s_cap.hidden.shape[:2]
        try:
            problem = s_cap.problem("student", positions) or t_cap.problem("teacher", positions)
            if problem is None:
                s_weight, s_bias = head_parameters(s_head, student=True)
                t_weight, t_bias = head_parameters(t_head, student=False)
                if not getattr(self, "_fused_lm_heads_checked", False):  # once: one host synchronisation
                    problem = logits_match(s_head, s_cap.hidden, outputs.logits, s_weight, s_bias) or logits_match(
                        t_head, t_cap.hidden, teacher_outputs.logits, t_weight, t_bias
                    )
                    self._fused_lm_heads_checked = True
        except UnsupportedHead as reason:
            problem = str(reason)
        if problem is not None:
            self._disable_fused_lm_head(problem)
            return None

        s_hidden = s_cap.hidden
        mask, targets = self._positions(s_hidden, inputs)
        self._require_targets(targets)
        total, sum_distill, sum_task = fused_linear_distillation_loss(
            s_hidden,
            s_weight,
            t_cap.hidden.to(s_hidden.device),
            t_weight,
            targets if args.alpha < 1.0 else None,
            loss_type=args.loss_type,
            temperature=args.temperature,
            alpha=args.alpha,
            beta=args.jsd_beta,
            mask=mask,
            student_bias=s_bias,
            teacher_bias=t_bias,
            vocab_size=self._shared_width or min(s_weight.shape[0], t_weight.shape[0]),
            student_logit_scale=s_head.logit_scale,
            teacher_logit_scale=t_head.logit_scale,
            student_logit_softcap=s_head.logit_softcap,
            teacher_logit_softcap=t_head.logit_softcap,
            chunk_size=args.fused_lm_head_chunk_size,
        )
        local_items, denominator = self._loss_normalisers(s_hidden, mask, num_items_in_batch, model)
        means = {"loss_distill": sum_distill / local_items}
        if args.alpha < 1.0:
            means["loss_task"] = sum_task / local_items
        if want_hidden:
            means["loss_hidden"] = self._hidden_loss(outputs, teacher_outputs, inputs.get("attention_mask"))
            total = total + args.hidden_loss_weight * means["loss_hidden"] * local_items
        return self._record_loss_parts(model, total / denominator, means, num_items_in_batch)

    # ------------------------------------------------------------------ offline: cached teacher targets
    def _check_cached_targets(self, model: nn.Module, args: DistillationConfig, kwargs: dict[str, Any]):
        """Before any step: the datasets' cached targets must fit the student, the config and their own rows."""
        train = kwargs.get("train_dataset")
        spec = cached_targets_spec(train, "train_dataset")
        if spec is None:
            raise ValueError(
                "teacher_model: DistillationTrainer needs a teacher (a model, or a name/path to load), or a "
                "train_dataset carrying cached teacher targets (made by cache_teacher_logits); train_dataset has none."
            )
        tokenizer = kwargs.get("processing_class")
        check = _CachedTargetsCheck(
            task=self.task,
            temperature=args.temperature,
            loss_type=args.loss_type,
            hidden_loss_weight=args.hidden_loss_weight,
            student_width=_output_width(model, self.task),
            tokenizer_length=len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None,
        )
        self._shared_width = check(spec, "train_dataset")
        check.shared_width = self._shared_width
        self._cached_targets_check = check
        eval_sets = kwargs.get("eval_dataset")
        eval_sets = eval_sets if isinstance(eval_sets, dict) else {"": eval_sets}
        datasets_to_check = [("train_dataset", train, spec)]
        for key, dataset in eval_sets.items():
            name = f"eval_dataset[{key!r}]" if key else "eval_dataset"
            eval_spec = cached_targets_spec(dataset, name)
            if eval_spec is not None:  # an eval set without a cache is scored with the task loss alone
                check(eval_spec, name)
                datasets_to_check.append((name, dataset, eval_spec))
        for name, dataset, dataset_spec in datasets_to_check:
            if not isinstance(dataset, torch.utils.data.IterableDataset) and not _is_iterable_dataset(dataset):
                check_cached_rows(dataset, dataset_spec, name)  # iterable datasets: checked batch by batch
        logger.info(
            "Training from cached teacher targets (%s, k=%d, temperature %g); no teacher is loaded.",
            spec.method,
            spec.k,
            spec.temperature,
        )
        return spec

    def _setup_cached_targets(self) -> None:
        self.teacher_model = None
        self.data_collator = CachedTargetsCollator(self.data_collator, check=self._cached_targets_check)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if getattr(self, "_cached_targets", None) is not None:
            # Keep the cached targets past remove_unused_columns: the collator pads them, the loss reads them.
            self._signature_columns += [c for c in CACHE_COLUMNS if c not in self._signature_columns]

    def _remove_unused_columns(self, dataset, description: str | None = None):
        dataset = super()._remove_unused_columns(dataset, description)
        if (
            getattr(self, "_cached_targets", None) is not None
            and COLUMN_CONFIG in dataset.column_names
            and dataset.format["type"] is None
        ):
            # Arrow -> numpy per batch instead of Python lists of ints: collation stays a small cost per step.
            numeric = [c for c in CACHE_COLUMNS if c in dataset.column_names and c != COLUMN_CONFIG]
            dataset = dataset.with_format("numpy", columns=numeric, output_all_columns=True)
        return dataset

    def _compute_cached_targets_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`compute_loss` against cached teacher targets: same mixing, masking and normalisation as with a teacher."""
        args: DistillationConfig = self.args
        cached = {k: inputs[k] for k in CACHED_BATCH_KEYS if k in inputs}
        student_inputs = {k: v for k, v in inputs.items() if k != "labels" and k not in CACHED_BATCH_KEYS}
        outputs = model(**student_inputs)
        s_logits = outputs.logits
        if self._shared_width is not None:
            s_logits = s_logits[..., : self._shared_width]
        mask, targets = self._positions(s_logits, inputs)
        attention_mask = inputs.get("attention_mask")
        if self.task == "causal-lm" and attention_mask is not None:
            # A left pad before the first token "predicts" it; no target is cached at a padding position.
            mask = mask & attention_mask.bool()
        self._require_targets(targets)
        local_items, denominator = self._loss_normalisers(s_logits, mask, num_items_in_batch, model)

        means: dict[str, torch.Tensor] = {}
        if not cached:
            if model.training or targets is None:
                raise ValueError(
                    "a batch carries no cached teacher targets, and DistillationTrainer has no teacher "
                    "(teacher_model=None): cache this dataset with cache_teacher_logits."
                )
            # An evaluation set without a cache: the task loss alone, since there is no teacher to compare with.
            total = self._task_loss(s_logits, targets, mask)
            means["loss_task"] = total / local_items
        else:
            device = s_logits.device
            ids = cached[BATCH_IDS].to(device, non_blocking=True)
            probs = cached[BATCH_PROBS].to(device, non_blocking=True)
            rest = cached.get(BATCH_REST)
            neg_entropy = cached.get(BATCH_NEG_ENTROPY)
            rest = rest.to(device, non_blocking=True) if rest is not None else None
            neg_entropy = neg_entropy.to(device, non_blocking=True) if neg_entropy is not None else None
            if args.loss_type == "forward_kl":
                total, sum_distill, sum_task = sparse_forward_kl_and_cross_entropy(
                    s_logits,
                    ids,
                    probs,
                    rest,
                    neg_entropy,
                    targets if args.alpha < 1.0 else None,
                    args.temperature,
                    args.alpha,
                    mask,
                )
            else:
                sum_distill = sparse_distillation_loss(
                    s_logits, ids, probs, rest, args.loss_type, args.temperature, args.jsd_beta, mask, reduction="sum"
                )
                total = args.alpha * sum_distill
                if args.alpha < 1.0:
                    sum_task = self._task_loss(s_logits, targets, mask)
                    total = total + (1.0 - args.alpha) * sum_task
            means["loss_distill"] = sum_distill / local_items
            if args.alpha < 1.0:
                means["loss_task"] = sum_task / local_items
        loss = self._record_loss_parts(model, total / denominator, means, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        parts = self._loss_parts[mode]
        prefix = "eval_" if mode == "eval" else ""
        for key, values in parts.items():
            if values:
                logs[f"{prefix}{key}"] = round(torch.stack(values).float().mean().item(), 6)
        parts.clear()
        if mode == "train" and self._nonfinite_skipped:
            logs["nonfinite_skipped"] = self._nonfinite_skipped
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ reliability (guard: see guard.py)
    def _setup_batch_guard(self, student: nn.Module, teacher: nn.Module) -> None:
        limits = [n for n in (_input_vocabulary(student), _input_vocabulary(teacher)) if n]
        self._input_id_limit = min(limits) if limits else None
        self._label_limit = self._shared_width or _output_width(student, self.task)
        self._nonfinite_skipped = 0
        self._guard_first_batch_done = False

    def _guarded_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """`_distillation_loss` with every check of the batch (inputs, ids, labels, loss parts) in one host sync.

        With `nonfinite="off"` only the first batch is checked (ids and labels ranges)."""
        check_values = self.args.nonfinite != "off"
        self._guard_first_batch_done = True
        raw_inputs = inputs
        inputs, flags = prepare_batch_checks(
            inputs, input_id_limit=self._input_id_limit, label_limit=self._label_limit
        )
        if not check_values:
            flags = {k: v for k, v in flags.items() if not k.startswith("input ")}
        recorded = self._loss_parts["train"]
        counts = {key: len(values) for key, values in recorded.items()}
        loss, outputs = self._distillation_loss(model, inputs, True, num_items_in_batch)
        parts = {"loss": loss}
        parts.update({k: v[-1] for k, v in recorded.items() if len(v) > counts.get(k, 0)})
        if check_values:
            flags.update(loss_flags(parts))
        bad = bad_parts(flags)
        if bad:
            loss = self._handle_bad_batch(model, raw_inputs, inputs, outputs, bad, parts)
            for key, values in recorded.items():  # the skipped batch's parts stay out of the logged means
                del values[counts.get(key, 0) :]
        return (loss, outputs) if return_outputs else loss

    def _handle_bad_batch(self, model, raw_inputs, inputs, outputs, bad: list[str], parts) -> torch.Tensor:
        """Raise naming what is wrong, or (`nonfinite="skip"`) count the batch and return a loss of zero gradient."""
        step = self.state.global_step + 1
        range_problems, nonfinite = [], []
        for name in bad:
            if name in ID_INPUTS:
                range_problems.append(describe_out_of_range(name, raw_inputs[name], self._input_id_limit))
            elif name == "labels":
                range_problems.append(
                    describe_out_of_range("labels", raw_inputs["labels"], self._label_limit, ignore_index=-100)
                )
            elif name.startswith("input "):
                key = name.removeprefix("input ")
                nonfinite.append(describe_nonfinite_tensor(f"input {key!r}", raw_inputs[key]) or name)
        bad_losses = [name for name in bad if name in parts]
        student_finite = not any(n.startswith("input ") for n in bad)
        if bad_losses and student_finite and not range_problems:
            # Locate the cause: the teacher's logits (recomputed, failure path only) or the student's.
            try:
                teacher_logits = self._teacher_forward(inputs).logits
            except Exception:  # a teacher that cannot run twice: name the loss parts only
                teacher_logits = None
            student_logits = (
                outputs.logits if outputs is not None else self._student_logits_for_diagnosis(model, inputs)
            )
            for label, logits in (("teacher logits", teacher_logits), ("student logits", student_logits)):
                found = describe_nonfinite_tensor(label, logits, rows=True)
                if found:
                    nonfinite.append(found)
                    student_finite = student_finite and label != "student logits"
            nonfinite.append(
                "loss parts " + ", ".join(f"{name}={float(parts[name].detach().float()):.4g}" for name in bad_losses)
            )
        raise_or_warn(
            bad, step=step, policy=self.args.nonfinite, range_problems=range_problems, nonfinite_problems=nonfinite
        )
        self._nonfinite_skipped += 1
        logger.warning(
            f"Training step {step}: skipped a batch with non-finite values ({'; '.join(nonfinite)}); "
            f"{self._nonfinite_skipped} batch(es) skipped so far (nonfinite='skip')."
        )
        return self._zero_gradient_loss(model, outputs, student_finite)

    @staticmethod
    def _student_logits_for_diagnosis(model, inputs) -> torch.Tensor | None:
        """The student's full logits, recomputed on the failure path of the fused LM-head loss (which never builds
        them) to say where a non-finite value came from."""
        try:
            with torch.no_grad():
                return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        except Exception:  # a model that cannot run twice: the loss parts are named without it
            return None

    def _zero_gradient_loss(self, model, outputs, student_finite: bool) -> torch.Tensor:
        """A loss whose gradient is exactly zero for every trainable parameter, so a skipped batch changes nothing
        (the optimizer still steps on the other micro-batches of the step, and under DDP every rank reduces)."""
        logits = getattr(outputs, "logits", None)
        if student_finite and torch.is_tensor(logits) and logits.requires_grad:
            return logits.sum() * 0.0  # the student's own graph is finite: zero times it is zero everywhere
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise NonFiniteError(
                f"Training step {self.state.global_step + 1}: the student's own forward pass is non-finite, and with "
                "sharded parameters (FSDP / DeepSpeed) the batch cannot be skipped without running its backward "
                "pass; nonfinite='skip' only skips batches whose student forward is finite here."
            )
        # The student's graph holds NaN/inf (0 * NaN is NaN): take the zero from the parameters themselves.
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.stack([p.sum(dtype=torch.float32) for p in params]).nan_to_num().sum() * 0.0

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, with checks before the first step: the output folder is writable, `ddp_timeout` bounds
        every collective, and `resume_from_checkpoint=True` resumes from the last *complete* checkpoint (an
        incomplete one, e.g. from a process killed while saving, is skipped with a warning); a checkpoint path
        given explicitly must be complete."""
        resume_from_checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        honour_ddp_timeout(self.args)
        if self.args.should_save and str(self.args.save_strategy) not in ("no", "SaveStrategy.NO"):
            check_writable_folder("output_dir", self.args.output_dir)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _resolve_checkpoint(self, resume_from_checkpoint):
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True:
            path = last_complete_checkpoint(self.args.output_dir)
            if path is None:
                raise ValueError(
                    f"resume_from_checkpoint=True: no complete checkpoint in output_dir={self.args.output_dir!r}."
                )
        else:
            path = os.fspath(resume_from_checkpoint)
            problems = checkpoint_problems(path)
            if problems:
                raise CorruptCheckpointError(
                    f"resume_from_checkpoint={path!r} is not a complete checkpoint: {'; '.join(problems)}."
                )
        # Callbacks (PruningCallback's masks) find the checkpoint folder there.
        self.args.resume_from_checkpoint = path
        return path

    # ------------------------------------------------------------------ model card
    def create_model_card(self, *args, tags: str | list[str] | None = None, **kwargs) -> None:
        """`Trainer.create_model_card` (called by `push_to_hub`), keeping hf_compress's part of the card: the
        compression section (written by [`CompressionReportCallback`], or made here from the model), the distillation
        settings (temperature, alpha, loss_type, ...) and those of the pruning / QAT / PTQ callbacks in the
        hyperparameter list, `base_model` and the tags `hf_compress`, `model-compression`, `knowledge-distillation`."""
        from ..reporting.callback import _default_methods, compression_settings, hub_name
        from ..reporting.measure import size_figures
        from ..reporting.render import MODEL_CARD_BEGIN, restore_model_card_section, write_model_card

        path = os.path.join(self.args.output_dir, "README.md")
        previous = open(path, encoding="utf-8").read() if os.path.isfile(path) else None
        super().create_model_card(*args, tags=tags, **kwargs)
        if not self.is_world_process_zero():
            return
        settings = compression_settings(self.args, self.callback_handler.callbacks)
        base_model = hub_name(self.model) or hub_name(self.teacher_model)
        restore_model_card_section(self.args.output_dir, previous, settings=settings, base_model=base_model)
        if MODEL_CARD_BEGIN not in open(path, encoding="utf-8").read():
            figures = size_figures(self.model)
            methods = _default_methods(self.args, self.model, figures)
            write_model_card(self.args.output_dir, figures, methods, settings=settings, base_model=base_model)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.hidden_projector is not None and self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            torch.save(self.hidden_projector.state_dict(), os.path.join(folder, PROJECTOR_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PROJECTOR_FILE)
        if self.hidden_projector is not None and os.path.isfile(path):
            self.hidden_projector.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))


class _ProjectorCallback(TrainerCallback):
    """Internal callback: syncs projector gradients across ranks before each optimizer step."""

    def __init__(self, sync: _SyncProjectorGradients):
        self.sync = sync

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.sync()


def _log_compression_figures_before_integrations(handler) -> None:
    """Move hf_compress callbacks ahead of the reporting integrations (TensorBoard, W&B, ...).

    User callbacks come after the integrations in transformers' order, so keys they add to the logs in `on_log`
    (sparsity, QAT and report figures) would reach the progress bar and `log_history` but not TensorBoard or W&B.
    """
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    integrations = tuple(INTEGRATION_TO_CALLBACK.values())
    ours = [cb for cb in handler.callbacks if type(cb).__module__.startswith("hf_compress.")]
    if not ours or not any(isinstance(cb, integrations) for cb in handler.callbacks):
        return
    rest = [cb for cb in handler.callbacks if cb not in ours]
    first = next(i for i, cb in enumerate(rest) if isinstance(cb, integrations))
    handler.callbacks = rest[:first] + ours + rest[first:]


def _prepare_deepspeed_teacher(teacher: nn.Module, accelerator) -> nn.Module:
    """Wrap the teacher in a DeepSpeed inference engine that follows the run's ZeRO stage.

    Under ZeRO-3 the teacher's parameters are partitioned across ranks like the student's, instead of a full copy
    per rank; under stages 0-2 parameters are not partitioned, so stage 0 is used. No optimizer is created.
    """
    import deepspeed

    plugin = accelerator.state.deepspeed_plugin
    config = copy.deepcopy(plugin.deepspeed_config)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    hidden = _hidden_width(teacher)
    if stage == 3 and hidden is not None:
        config["zero_optimization"].update(
            {
                "reduce_bucket_size": hidden * hidden,
                "stage3_param_persistence_threshold": 10 * hidden,
                "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            }
        )
    if stage != 3:
        config["zero_optimization"] = {"stage": 0}
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine
