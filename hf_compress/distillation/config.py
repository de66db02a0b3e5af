"""`DistillationConfig`: `TrainingArguments` plus the knobs of knowledge distillation."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from ..utils.tasks import normalize_task
from .losses import HIDDEN_LOSS_TYPES, LOSS_TYPES

TASKS = ("auto", "sequence-classification", "causal-lm", "token-classification")
_DISTILLATION_TASKS = TASKS[1:]


def _did_you_mean(value: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(value), allowed, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


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

    def __post_init__(self):
        self._validate_distillation_fields()
        super().__post_init__()

    def _validate_distillation_fields(self) -> None:
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or self.temperature <= 0
        ):
            raise ValueError(f"temperature={self.temperature!r} is out of range; it must be a number > 0.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha!r} is out of range; it must be a number in [0, 1].")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type={self.loss_type!r} is not supported; allowed: {list(LOSS_TYPES)}."
                + _did_you_mean(self.loss_type, LOSS_TYPES)
            )
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta={self.jsd_beta!r} is out of range; it must be in [0, 1].")
        self.task = normalize_task(self.task, _DISTILLATION_TASKS, extra=("auto",))
        if self.hidden_loss_weight < 0:
            raise ValueError(f"hidden_loss_weight={self.hidden_loss_weight!r} must be >= 0.")
        if self.hidden_loss_type not in HIDDEN_LOSS_TYPES:
            raise ValueError(
                f"hidden_loss_type={self.hidden_loss_type!r} is not supported; allowed: {list(HIDDEN_LOSS_TYPES)}."
            )
        if self.hidden_layer_mapping is not None:
            mapping = list(self.hidden_layer_mapping)
            if not mapping or any(not isinstance(i, int) or i < 0 for i in mapping):
                raise ValueError(
                    f"hidden_layer_mapping={self.hidden_layer_mapping!r} must be a non-empty list of teacher layer "
                    "indices >= 0, one per student layer."
                )
            self.hidden_layer_mapping = mapping
        if not isinstance(self.fused_lm_head_loss, bool):
            raise ValueError(
                f"fused_lm_head_loss={self.fused_lm_head_loss!r} must be a bool (True: chunked loss without full "
                "logits, False: materialised logits)."
            )
        if self.fused_lm_head_chunk_size is not None and (
            isinstance(self.fused_lm_head_chunk_size, bool)
            or not isinstance(self.fused_lm_head_chunk_size, int)
            or self.fused_lm_head_chunk_size < 1
        ):
            raise ValueError(
                f"fused_lm_head_chunk_size={self.fused_lm_head_chunk_size!r} must be a positive int (positions per "
                "chunk) or None (automatic)."
            )
        if isinstance(self.teacher_model_init_kwargs, str):
            try:
                self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"teacher_model_init_kwargs={self.teacher_model_init_kwargs!r} is not valid JSON: {err}."
                ) from None
        if self.teacher_model_init_kwargs is not None and not isinstance(self.teacher_model_init_kwargs, dict):
            raise ValueError(
                f"teacher_model_init_kwargs must be a dict or a JSON object string, got "
                f"{type(self.teacher_model_init_kwargs).__name__}."
            )
