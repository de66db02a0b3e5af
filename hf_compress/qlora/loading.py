"""Loading a model on a 4-bit (NF4, double quantization) or 8-bit base and preparing it for LoRA training: the task
classes, the bitsandbytes config that keeps heads in full precision, k-bit preparation and gradient checkpointing."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.utils import logging

from ..utils import find_linear_modules, require_backend, unwrap_model
from ..utils import validation as _validation
from ..utils.tasks import normalize_task
from .loftq import loftq_init_
from .targets import _linear_names, find_lora_target_modules

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig

logger = logging.get_logger(__name__)


# task name -> (transformers auto class, PEFT task type)
_TASKS: dict[str, tuple[str, str]] = {
    "causal-lm": ("AutoModelForCausalLM", "CAUSAL_LM"),
    "sequence-classification": ("AutoModelForSequenceClassification", "SEQ_CLS"),
    "token-classification": ("AutoModelForTokenClassification", "TOKEN_CLS"),
    "question-answering": ("AutoModelForQuestionAnswering", "QUESTION_ANS"),
    "seq2seq-lm": ("AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    "feature-extraction": ("AutoModel", "FEATURE_EXTRACTION"),
}
_PEFT_TASK_TO_TASK = {peft_task: task for task, (_, peft_task) in _TASKS.items()}
# Tasks whose head is new and must train with the adapters (PEFT `modules_to_save`).
_TASKS_WITH_TRAINABLE_HEAD = ("sequence-classification", "token-classification", "question-answering")


# --------------------------------------------------------------------------------------------------------------
# argument checks and small helpers
# --------------------------------------------------------------------------------------------------------------
def _check_lora_args(lora_r: int, lora_alpha: float | None, lora_dropout: float) -> float:
    if not isinstance(lora_r, int) or isinstance(lora_r, bool) or lora_r < 1:
        raise ValueError(f"lora_r={lora_r!r} is invalid: the LoRA rank must be a positive integer (e.g. 8, 16, 64).")
    if lora_alpha is None:
        lora_alpha = 2 * lora_r
    if not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
        raise ValueError(f"lora_alpha={lora_alpha!r} is invalid: it must be a positive number (default 2 * lora_r).")
    if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout={lora_dropout!r} is invalid: it must lie in [0, 1).")
    return float(lora_alpha)


def _lora_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """The LoRA arguments among a call's `locals()`, for `utils.validation.check_lora_arguments`."""
    names = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save")
    names += ("gradient_checkpointing", "loftq", "lora_kwargs")
    return {name: arguments[name] for name in names}


def _check_task(task) -> str:
    """The canonical task name (PEFT `TaskType` values and pipeline names accepted, see `utils.tasks`)."""
    return normalize_task(task, _TASKS)


def _auto_class(task: str):
    import transformers

    return getattr(transformers, _TASKS[task][0])


def _supported_tasks(config) -> list[str]:
    return [task for task in _TASKS if type(config) in _auto_class(task)._model_mapping]


def _check_task_supported(task: str, config) -> None:
    if type(config) not in _auto_class(task)._model_mapping:
        raise ValueError(
            f"task={task!r} is not supported by model type {config.model_type!r} ({type(config).__name__}): "
            f"transformers has no {_TASKS[task][0]} class for it. Tasks this model supports: "
            f"{_supported_tasks(config)}."
        )


def _infer_task(model: nn.Module) -> str:
    name = type(unwrap_model(model)).__name__
    for suffix, task in (
        ("ForCausalLM", "causal-lm"),
        ("LMHeadModel", "causal-lm"),
        ("ForSequenceClassification", "sequence-classification"),
        ("ForTokenClassification", "token-classification"),
        ("ForQuestionAnswering", "question-answering"),
        ("ForConditionalGeneration", "seq2seq-lm"),
        ("ForSeq2SeqLM", "seq2seq-lm"),
    ):
        if name.endswith(suffix):
            return task
    return "feature-extraction"


def _default_device_map() -> dict[str, Any]:
    """Each process loads the whole model on its own device, so `accelerate launch` / torchrun DDP works: with
    `device_map="auto"` every rank would spread the model over all GPUs."""
    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        from accelerate import PartialState

        return {"": f"xpu:{PartialState().local_process_index}"}
    return {"": "cpu"}


def _dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    try:
        dtype = getattr(torch, str(value).replace("torch.", ""))
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {value!r} is not a floating point torch dtype (use bfloat16, float16 or float32).")
    return dtype


def _head_module_names(model: nn.Module) -> list[str]:
    """Top-level modules the task class adds around the backbone (`classifier`, `score`, `pre_classifier`,
    `qa_outputs`, `lm_head`, ...), read from the architecture instead of a list of known names."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return [
        name
        for name, child in model.named_children()
        if child is not backbone and any(True for _ in child.parameters(recurse=True))
    ]


def _modules_kept_in_full_precision(model: nn.Module) -> list[str]:
    """Linear layers outside the repeated transformer blocks (output/classification heads, poolers): bitsandbytes
    must leave them alone, so the head stays trainable through `modules_to_save` and the LM head keeps its
    precision (transformers' own default only spares the output embedding and the very last parameter)."""
    try:
        in_blocks = set(find_linear_modules(model))
    except ValueError:  # no Linear layer inside repeated blocks: quantize nothing specially
        in_blocks = set()
    return sorted(name for name in _linear_names(model) if name not in in_blocks)


def _empty_model(task: str, config) -> nn.Module:
    """The architecture on the meta device: module names without allocating weights."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return _auto_class(task).from_config(config)


def _bnb_config(
    model_skeleton: nn.Module,
    *,
    load_in_4bit: bool = True,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = True,
    bnb_4bit_compute_dtype: torch.dtype = torch.bfloat16,
):
    from transformers import BitsAndBytesConfig

    skip = _modules_kept_in_full_precision(model_skeleton)
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=load_in_4bit,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=bnb_4bit_compute_dtype,
        llm_int8_skip_modules=skip,
    )


def _is_kbit(model: nn.Module) -> bool:
    model = unwrap_model(model)
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


# --------------------------------------------------------------------------------------------------------------
# preparing / loading
# --------------------------------------------------------------------------------------------------------------
# Longer than 80 lines because of its docstring (a public API: every argument documented); the code is 62 lines.
def prepare_qlora(
    model: nn.Module,
    task: str | None = None,
    *,
    lora_r: int = 16,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.05,
    target_modules: str | Sequence[str] | None = "all-linear",
    exclude_modules: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
    gradient_checkpointing: bool = True,
    loftq: bool = False,
    loftq_model_path: str | os.PathLike | None = None,
    lora_kwargs: dict[str, Any] | None = None,
):
    """Wrap a model the caller already loaded (4-bit, 8-bit or 16/32-bit) with LoRA adapters, ready for Trainer.

    For a k-bit model this runs PEFT's `prepare_model_for_kbit_training` (freezes the base, upcasts the
    non-quantized parameters to fp32); a 16/32-bit model is left in its dtype, so 16-bit LoRA stays 16-bit. Both get
    non-reentrant gradient checkpointing (`use_reentrant=False`).

    Args:
        model (`PreTrainedModel`): the loaded model.
        task (`str`, *optional*): one of `causal-lm`, `sequence-classification`, `token-classification`,
            `question-answering`, `seq2seq-lm`, `feature-extraction` (or PEFT's `TaskType` / pipeline task names:
            `CAUSAL_LM`, `text-generation`, `SEQ_CLS`, `text-classification`, ...); inferred from the class name when
            omitted.
        lora_r (`int`, *optional*, defaults to 16): LoRA rank.
        lora_alpha (`float`, *optional*, defaults to `2 * lora_r`): LoRA scaling numerator.
        lora_dropout (`float`, *optional*, defaults to 0.05): dropout on the LoRA input.
        target_modules (`str` or `list[str]`, *optional*, defaults to `"all-linear"`):
            see [`find_lora_target_modules`].
        exclude_modules (`str` or `list[str]`, *optional*): names removed from the targets.
        modules_to_save (`list[str]`, *optional*): modules trained fully and saved with the adapter. Defaults to the
            task head found from the architecture (`classifier`, `score`, `pre_classifier`, `qa_outputs`) for
            classification / QA tasks, nothing for language modelling (the LM head stays frozen).
        gradient_checkpointing (`bool`, *optional*, defaults to `True`): non-reentrant checkpointing
            (`use_reentrant=False`, no input-grad hook needed).
        loftq (`bool`, *optional*, defaults to `False`): LoftQ initialisation of the adapters (Li et al., 2023,
            https://arxiv.org/abs/2310.08659) from the full-precision weights in `loftq_model_path`; needs a 4-bit
            model.
        loftq_model_path (`str`, *optional*): folder holding the full-precision safetensors of the base; defaults to
            `model.config._name_or_path`.
        lora_kwargs (`dict`, *optional*): extra `peft.LoraConfig` arguments (`use_dora`, `use_rslora`, ...).

    Returns:
        `peft.PeftModel`

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    >>> base = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    >>> model = prepare_qlora(base, lora_r=8)
    >>> model.print_trainable_parameters()
    ```
    """
    _validation.check_prepare_qlora_arguments(
        model, task, loftq_model_path=loftq_model_path, **_lora_arguments(locals())
    )
    require_backend("peft", "QLoRA adapters")
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    alpha = _check_lora_args(lora_r, lora_alpha, lora_dropout)
    model = unwrap_model(model)
    task = _check_task(task or _infer_task(model))
    targets = find_lora_target_modules(model, target_modules, exclude_modules)
    if modules_to_save is None and task in _TASKS_WITH_TRAINABLE_HEAD:
        modules_to_save = [n for n in _head_module_names(model) if n != "lm_head"]
    kbit = _is_kbit(model)
    if loftq and not getattr(model, "is_loaded_in_4bit", False):
        raise ValueError("loftq=True needs a model loaded in 4-bit: LoftQ fits the adapters to the 4-bit error.")

    if kbit:
        # freeze the base and upcast its non-quantized parameters to fp32; checkpointing is enabled below instead,
        # because PEFT calls the deprecated `gradient_checkpointing_enable` and, for reentrant checkpoints only,
        # needs an input-grad hook that non-reentrant checkpoints do without.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        gc_kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if gradient_checkpointing and getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # the KV cache is useless (and warned about) under checkpointing

    config = LoraConfig(
        r=lora_r,
        lora_alpha=alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type=getattr(TaskType, _TASKS[task][1]),
        **(lora_kwargs or {}),
    )
    peft_model = get_peft_model(model, config)
    if loftq:
        path = loftq_model_path or getattr(model.config, "_name_or_path", None)
        loftq_init_(peft_model, path)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(
        f"QLoRA: {type(model).__name__} ({'k-bit' if kbit else 'full precision'}), targets {targets}, "
        f"modules_to_save {config.modules_to_save}: {trainable:,} of {total:,} parameters trainable "
        f"({100 * trainable / max(total, 1):.2f}%)"
    )
    return peft_model


# Longer than 80 lines because of its docstring (a public API: every argument documented); the code is 73 lines.
def load_qlora_model(
    model_name_or_path: str | os.PathLike | PretrainedConfig,
    task: str = "causal-lm",
    *,
    lora_r: int = 16,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.05,
    target_modules: str | Sequence[str] | None = "all-linear",
    exclude_modules: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
    load_in_4bit: bool = True,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = True,
    bnb_4bit_compute_dtype: str | torch.dtype = torch.bfloat16,
    gradient_checkpointing: bool = True,
    loftq: bool = False,
    num_labels: int | None = None,
    device_map: Any = None,
    lora_kwargs: dict[str, Any] | None = None,
    **model_kwargs,
):
    """Load a model on a 4-bit base (NF4, double quantization, bf16 compute) with LoRA adapters, ready for Trainer.

    The recipe of QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314) in one call: the Linear layers of
    the transformer blocks are quantized and get adapters, the heads stay in full precision (a classification head
    trains through `modules_to_save`, the LM head stays frozen), gradient checkpointing is non-reentrant and each
    process loads the model on its own device, so the same script runs under `accelerate launch` DDP.

    Args:
        model_name_or_path (`str` or `PretrainedConfig`): hub name or local folder of a transformers model, or a
            config whose weights are passed in memory as `state_dict=` (a dict of tensors, e.g. on CPU; they are
            quantized one by one as they are loaded, so nothing is written to disk and the 16-bit model is never whole
            on the GPU).
        task (`str`, *optional*, defaults to `"causal-lm"`): `causal-lm`, `sequence-classification`,
            `token-classification`, `question-answering`, `seq2seq-lm` or `feature-extraction`; PEFT's `TaskType`
            values (`CAUSAL_LM`, `SEQ_CLS`, ... or the enum) and pipeline task names (`text-generation`,
            `text-classification`, ...) work too.
        lora_r, lora_alpha, lora_dropout, target_modules, exclude_modules, modules_to_save, gradient_checkpointing,
        lora_kwargs: see [`prepare_qlora`].
        load_in_4bit (`bool`, *optional*, defaults to `True`): quantize the base to 4 bits with bitsandbytes.
        load_in_8bit (`bool`, *optional*, defaults to `False`): quantize to 8 bits (LLM.int8()) instead.
            With both `False` the base is loaded in `bnb_4bit_compute_dtype` (plain 16-bit LoRA).
        bnb_4bit_quant_type (`str`, *optional*, defaults to `"nf4"`): `"nf4"` or `"fp4"`.
        bnb_4bit_use_double_quant (`bool`, *optional*, defaults to `True`): quantize the quantization constants.
        bnb_4bit_compute_dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): matmul dtype.
        loftq (`bool`, *optional*, defaults to `False`): LoftQ initialisation of the adapters from the
            full-precision safetensors of `model_name_or_path` (4-bit only).
        num_labels (`int`, *optional*): number of labels of a classification head.
        device_map (*optional*): defaults to the current process's device (`{"": local_rank}` on CUDA, CPU otherwise).
        model_kwargs: passed to `from_pretrained` (`attn_implementation`, `revision`, a `quantization_config` of
            your own, ...). `gguf_file=` (or a `.gguf` path as `model_name_or_path`) loads a GGUF checkpoint,
            dequantized once into a cached folder ([`~hf_compress.utils.loading.gguf_to_folder`]).

    Returns:
        `peft.PeftModel`

    Raises:
        ImportError: quantization was asked for and bitsandbytes is not installed.
        ValueError: bad LoRA / quantization arguments, a task the model type does not support, or target names
            that match no Linear layer.

    Example:

    ```python
    >>> from hf_compress import load_qlora_model
    >>> model = load_qlora_model("meta-llama/Llama-3.2-1B", lora_r=16)
    >>> trainer = Trainer(model=model, args=TrainingArguments("out", bf16=True), train_dataset=train)
    ```
    """
    from transformers import AutoConfig, PretrainedConfig

    from_config = isinstance(model_name_or_path, PretrainedConfig)
    _validation.check_load_qlora_model_arguments(
        "<config>" if from_config else model_name_or_path,
        task,
        load_in_4bit=load_in_4bit,
        load_in_8bit=load_in_8bit,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=bnb_4bit_compute_dtype,
        num_labels=num_labels,
        device_map=device_map,
        **_lora_arguments(locals()),
    )
    from ..utils.loading import gguf_to_folder

    # A GGUF checkpoint (`.gguf` path or gguf_file=) is dequantized once into a cached folder: bitsandbytes
    # quantization cannot read GGUF.
    if not from_config:
        model_name_or_path = gguf_to_folder(model_name_or_path, model_kwargs.pop("gguf_file", None))
    task = _check_task(task)
    _check_lora_args(lora_r, lora_alpha, lora_dropout)
    if load_in_4bit and load_in_8bit:
        load_in_4bit = False  # `load_in_8bit=True` is the explicit opt-in; 4-bit is only the default
    if bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bnb_4bit_quant_type={bnb_4bit_quant_type!r} is invalid: use 'nf4' or 'fp4'.")
    if loftq and not load_in_4bit:
        raise ValueError("loftq=True needs load_in_4bit=True (LoftQ fits the adapters to the 4-bit error).")
    compute_dtype = _dtype(bnb_4bit_compute_dtype)
    quantize = load_in_4bit or load_in_8bit or model_kwargs.get("quantization_config") is not None
    if quantize:
        require_backend("bitsandbytes", "Loading a 4-bit/8-bit QLoRA base (load_in_4bit / load_in_8bit)")
    require_backend("peft", "QLoRA adapters")

    if from_config:
        # Weights given in memory (`state_dict=`), quantized tensor by tensor as they are loaded: nothing written to
        # disk, and the 16-bit model never exists whole on the GPU.
        if model_kwargs.get("state_dict") is None:
            raise ValueError(
                f"model_name_or_path is a {type(model_name_or_path).__name__}: pass the weights as state_dict=... "
                "(a dict of tensors keyed like the model's state_dict, e.g. on CPU), or a model folder instead."
            )
        if loftq:
            raise ValueError("loftq=True reads the full-precision safetensors of a model folder; pass a folder.")
        config = copy.deepcopy(model_name_or_path)
        if num_labels is not None:
            config.num_labels = num_labels
    else:
        config_kwargs = {k: model_kwargs[k] for k in ("revision", "trust_remote_code", "token") if k in model_kwargs}
        if num_labels is not None:
            config_kwargs["num_labels"] = num_labels
        config = AutoConfig.from_pretrained(model_name_or_path, **config_kwargs)
    _check_task_supported(task, config)
    if (load_in_4bit or load_in_8bit) and "quantization_config" not in model_kwargs:
        model_kwargs["quantization_config"] = _bnb_config(
            _empty_model(task, config),
            load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit,
            bnb_4bit_quant_type=bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if not quantize:
        model_kwargs.setdefault("dtype", compute_dtype)
    # The auto classes need a name or folder; with a config the concrete class loads from `state_dict`.
    model_class = _auto_class(task)._model_mapping[type(config)] if from_config else _auto_class(task)
    model = model_class.from_pretrained(
        None if from_config else model_name_or_path,
        config=config,
        device_map=device_map if device_map is not None else _default_device_map(),
        **model_kwargs,
    )
    return prepare_qlora(
        model,
        task,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        modules_to_save=modules_to_save,
        gradient_checkpointing=gradient_checkpointing,
        loftq=loftq,
        loftq_model_path=None if from_config else model_name_or_path,
        lora_kwargs=lora_kwargs,
    )


__all__ = ["load_qlora_model", "prepare_qlora"]
