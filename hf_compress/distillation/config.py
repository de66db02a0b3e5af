"""`DistillationConfig`: `TrainingArguments` plus the knobs of knowledge distillation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from ..utils.tasks import normalize_task
from ..utils.validation import (
    check_bool,
    check_choice,
    check_int,
    check_int_list,
    check_mapping,
    check_number,
    check_output_folder,
)
from .losses import HIDDEN_LOSS_TYPES, LOSS_TYPES

TASKS = ("auto", "sequence-classification", "causal-lm", "token-classification")
_DISTILLATION_TASKS = TASKS[1:]
# What a non-finite loss part, teacher output or input does to the step (see `DistillationTrainer`).
NONFINITE_POLICIES = ("raise", "skip", "off")


@dataclass
class DistillationConfig(TrainingArguments):
    r"""
    Arguments of [`DistillationTrainer`]: every [`~transformers.TrainingArguments`] field plus the ones below.
    Being a `TrainingArguments`, it also feeds `HfArgumentParser`, so each field is a command-line flag.

    The training loss is `alpha * distillation_loss + (1 - alpha) * task_loss (+ hidden_loss_weight * hidden_loss)`.

    Args:
        temperature (`float`, *optional*, defaults to `2.0`):
            Softening temperature T (> 0) applied to teacher and student logits for the KL and JSD losses.
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight in [0, 1] of the distillation loss; `1 - alpha` goes to the task (label) loss.
        loss_type (`str`, *optional*, defaults to `"forward_kl"`):
            `forward_kl` (KL(teacher || student) times T², Hinton et al. 2015), `reverse_kl` (KL(student ||
            teacher)), `jsd` (generalized Jensen-Shannon with `jsd_beta`, Agarwal et al. 2024) or `mse` (on raw
            logits).
        jsd_beta (`float`, *optional*, defaults to `0.5`): the beta in [0, 1] of the generalized JSD.
        task (`str`, *optional*, defaults to `"auto"`):
            `sequence-classification` (one distribution per example), `causal-lm` (one per next-token position),
            `token-classification` (one per token); `auto` infers it from the student's class. PEFT `TaskType`
            values (`SEQ_CLS`, `CAUSAL_LM`, `TOKEN_CLS`, the enum itself) and pipeline task names
            (`text-classification`, `text-generation`, `token-classification`) are accepted too
            ([`~hf_compress.utils.tasks.normalize_task`]); the canonical name is stored.
        hidden_loss_weight (`float`, *optional*, defaults to `0.0`):
            Weight (>= 0) of hidden-state distillation (TinyBERT / DistilBERT style); 0 turns it off.
        hidden_loss_type (`str`, *optional*, defaults to `"mse"`): `mse` or `cosine`.
        hidden_layer_mapping (`list[int]`, *optional*):
            For each student layer (in order), the teacher layer (1-based, as in `hidden_states[i]`) it learns from.
            Defaults to evenly spaced teacher layers: student layer i of S maps to teacher layer round(i * T / S).
        fused_lm_head_loss (`bool`, *optional*, defaults to `True`):
            Causal LMs only: compute the loss from both models' final hidden states and output heads chunk by chunk
            (`fused_linear_distillation_loss`), so neither model's full (batch x sequence x vocabulary) logits are
            built during training steps. Same values and gradients as the materialised path; `False` turns it off.
            Evaluation (which returns logits) and setups it cannot serve (a PEFT adapter on `lm_head`, DeepSpeed
            ZeRO-3, a head still sharded after the forward) use the materialised path, with one log line.
        fused_lm_head_chunk_size (`int`, *optional*):
            Positions per chunk of the fused loss; by default about 2^27 logits per chunk on CUDA (2^22 on CPU).
        teacher_model_init_kwargs (`dict` or JSON `str`, *optional*):
            Keyword arguments of `from_pretrained` when the teacher is given as a name or path, e.g.
            `{"dtype": "bfloat16"}` or `{"quantization_config": BitsAndBytesConfig(load_in_4bit=True)}`.
        nonfinite (`str`, *optional*, defaults to `"raise"`):
            What a NaN or inf in a float input (`inputs_embeds`, ...), the teacher's logits or a loss part does, and
            an input id or label out of range: `"raise"` stops the step with a [`NonFiniteError`] naming the part and
            the step; `"skip"` gives that batch a zero gradient and counts it in the logs (`nonfinite_skipped`);
            `"off"` checks nothing (no host sync).

    >>> from hf_compress import DistillationConfig
    >>> args = DistillationConfig(output_dir="out", temperature=2.0, alpha=0.5, loss_type="forward_kl")
    >>> args.alpha
    0.5
    """

    temperature: float = field(
        default=2.0, metadata={"help": "Softening temperature T > 0 for teacher and student logits."}
    )
    alpha: float = field(
        default=0.5, metadata={"help": "Weight in [0, 1] of the distillation loss; 1 - alpha weighs the task loss."}
    )
    loss_type: str = field(
        default="forward_kl",
        metadata={"help": "Distillation divergence.", "choices": list(LOSS_TYPES)},
    )
    jsd_beta: float = field(default=0.5, metadata={"help": "Beta in [0, 1] of the generalized JSD (loss_type=jsd)."})
    task: str = field(
        default="auto",
        metadata={
            "help": "What one distribution is: 'sequence-classification' (per example), 'causal-lm' (per next token) "
            "or 'token-classification' (per token); PEFT TaskType names (SEQ_CLS, CAUSAL_LM, TOKEN_CLS) and pipeline "
            "task names (text-classification, text-generation) work too. 'auto': from the student's class."
        },
    )
    hidden_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight >= 0 of hidden-state distillation; 0 disables it."}
    )
    hidden_loss_type: str = field(
        default="mse", metadata={"help": "Hidden-state distance.", "choices": list(HIDDEN_LOSS_TYPES)}
    )
    hidden_layer_mapping: list[int] | None = field(
        default=None,
        metadata={"help": "Teacher layer (1-based) for each student layer; default: evenly spaced."},
    )
    fused_lm_head_loss: bool = field(
        default=True,
        metadata={
            "help": "Causal LMs: compute the loss from hidden states and output heads chunk by chunk, without the "
            "full logits (same values). False: materialise the logits."
        },
    )
    fused_lm_head_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Positions per chunk of the fused LM-head loss; default: about 2^27 logits (CUDA)."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "from_pretrained kwargs (dict or JSON string) used when the teacher is a name or path."},
    )
    nonfinite: str = field(
        default="raise",
        metadata={
            "help": "A NaN/inf input, teacher output or loss part: 'raise' (stop with an error naming it and the "
            "step), 'skip' (drop that batch, count it in the logs) or 'off' (no check).",
            "choices": list(NONFINITE_POLICIES),
        },
    )

    def __post_init__(self):
        self._validate_distillation_fields()
        super().__post_init__()

    def _validate_distillation_fields(self) -> None:
        self.temperature = check_number("temperature", self.temperature, low=0.0, low_inclusive=False)
        self.alpha = check_number("alpha", self.alpha, low=0.0, high=1.0)
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        self.jsd_beta = check_number("jsd_beta", self.jsd_beta, low=0.0, high=1.0)
        self.task = normalize_task(self.task, _DISTILLATION_TASKS, extra=("auto",))
        self.hidden_loss_weight = check_number("hidden_loss_weight", self.hidden_loss_weight, low=0.0)
        check_choice("hidden_loss_type", self.hidden_loss_type, HIDDEN_LOSS_TYPES)
        self.hidden_layer_mapping = check_int_list(
            "hidden_layer_mapping", self.hidden_layer_mapping, low=0, allow_empty=False
        )
        check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        check_output_folder("output_dir", self.output_dir)
        self.fused_lm_head_loss = check_bool("fused_lm_head_loss", self.fused_lm_head_loss)
        if self.fused_lm_head_chunk_size is not None:
            self.fused_lm_head_chunk_size = check_int("fused_lm_head_chunk_size", self.fused_lm_head_chunk_size, low=1)
        if isinstance(self.teacher_model_init_kwargs, str):
            try:
                self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"teacher_model_init_kwargs={self.teacher_model_init_kwargs!r} is not valid JSON: {err}."
                ) from None
        check_mapping("teacher_model_init_kwargs", self.teacher_model_init_kwargs)
