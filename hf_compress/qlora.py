"""QLoRA helpers: a 4-bit (NF4, double quantization) base with LoRA adapters, ready for any Trainer, and a merge
that keeps the accuracy the adapter reached on the quantized base.

The heavy lifting is done by bitsandbytes (quantization kernels), transformers (`BitsAndBytesConfig`, loading,
`dequantize()`) and PEFT (`prepare_model_for_kbit_training`, `LoraConfig`, `merge_and_unload`). This module picks
the defaults of the QLoRA paper (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314), discovers the LoRA
targets from the architecture and merges the adapter into the *dequantized* base, the weights it was trained
against (merging into the original full-precision weights or into the 4-bit weights both change the function the
adapter learnt: peft#2321, peft#1043, transformers#31293).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.utils import logging

from .utils import find_linear_modules, require_backend, unwrap_model
from .utils.modules import LINEAR_TYPES

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
_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


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


def _check_task(task: str) -> None:
    if task not in _TASKS:
        raise ValueError(f"task={task!r} is not supported; choose one of {sorted(_TASKS)}.")


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


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)]


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
# target discovery
# --------------------------------------------------------------------------------------------------------------
def find_lora_target_modules(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = "all-linear",
    exclude_modules: str | Sequence[str] | None = None,
) -> list[str]:
    """Names of the Linear layers LoRA should adapt, in the suffix form PEFT's `target_modules` accepts.

    By default every Linear layer (GPT-2 `Conv1D` and bitsandbytes `Linear4bit`/`Linear8bitLt` included, which
    subclass `nn.Linear`) inside the repeated transformer blocks is selected; the LM head, classification heads and
    poolers never are. Each selected layer is named by the shortest dotted suffix that matches no unselected layer
    (BERT gives `intermediate.dense` and `output.dense` rather than `dense`, which would also catch the pooler).

    Args:
        model (`nn.Module`): a transformers model (quantized or not), possibly a `PeftModel`.
        target_modules (`str` or `list[str]`, *optional*, defaults to `"all-linear"`):
            `"all-linear"` / `None` for the default selection, or PEFT-style names / regexes to check and resolve.
        exclude_modules (`str` or `list[str]`, *optional*): names or regexes removed from the selection.

    Returns:
        `list[str]`: sorted suffixes, ready for `LoraConfig(target_modules=...)`.

    Raises:
        ValueError: a name of `target_modules` matches no Linear layer (the message lists the names there are).

    Example:

    ```python
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    ...                                      intermediate_size=128, vocab_size=96))
    >>> find_lora_target_modules(model)
    ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']
    ```
    """
    model = unwrap_model(model)
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    selected = find_linear_modules(model, target_modules, exclude_modules)
    # PEFT wraps adapted layers: the Linear is `<name>.base_layer`, the name PEFT matches is `<name>`.
    selected_names = {n.removesuffix(".base_layer") for n in selected}
    all_names = {n.removesuffix(".base_layer") for n in _linear_names(model)}
    others = all_names - selected_names
    suffixes: set[str] = set()
    for name in sorted(selected_names):
        parts = name.split(".")
        chosen = name
        for k in range(1, len(parts) + 1):
            tail = parts[-k:]
            if any(p.isdigit() for p in tail):
                break  # a suffix carrying a block index would select single layers only: use the full name
            suffix = ".".join(tail)
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                chosen = suffix
                break
        suffixes.add(chosen)
    return sorted(suffixes)


# --------------------------------------------------------------------------------------------------------------
# preparing / loading
# --------------------------------------------------------------------------------------------------------------
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
            `question-answering`, `seq2seq-lm`, `feature-extraction`; inferred from the class name when omitted.
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
    require_backend("peft", "QLoRA adapters")
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    alpha = _check_lora_args(lora_r, lora_alpha, lora_dropout)
    model = unwrap_model(model)
    task = task or _infer_task(model)
    _check_task(task)
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
            `token-classification`, `question-answering`, `seq2seq-lm` or `feature-extraction`.
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
            your own, ...).

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

    _check_task(task)
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

    from_config = isinstance(model_name_or_path, PretrainedConfig)
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


# --------------------------------------------------------------------------------------------------------------
# LoftQ
# --------------------------------------------------------------------------------------------------------------
class _SafetensorsWeights:
    """Reads single tensors lazily from a (possibly sharded) safetensors checkpoint folder."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_dir():
            try:
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(str(path), allow_patterns=["*.safetensors", "*.json"]))
            except Exception as err:
                raise ValueError(
                    f"LoftQ needs the full-precision safetensors of the base model; {str(path)!r} is neither a local "
                    f"folder nor a downloadable hub model ({err}). Pass loftq_model_path=<folder>."
                ) from err
        index = path / "model.safetensors.index.json"
        if index.exists():
            self.weight_map = {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (path / "model.safetensors").exists():
            self.weight_map = None
            self.file = path / "model.safetensors"
        else:
            raise ValueError(f"LoftQ needs model.safetensors (or a sharded index) in {str(path)!r}; none found.")

    def get(self, name: str, prefix: str | None) -> torch.Tensor:
        from safetensors import safe_open

        candidates = [name] + ([name[len(prefix) + 1 :]] if prefix and name.startswith(prefix + ".") else [])
        for key in candidates:
            file = self.file if self.weight_map is None else self.weight_map.get(key)
            if file is None:
                continue
            with safe_open(str(file), framework="pt", device="cpu") as f:
                if key in f.keys():
                    return f.get_tensor(key)
        raise KeyError(f"LoftQ: weight {name!r} not found in the full-precision checkpoint.")


@torch.no_grad()
def loftq_init_(peft_model, model_path: str | os.PathLike | None, adapter_name: str = "default") -> int:
    """LoftQ initialisation of the LoRA weights of a bitsandbytes 4-bit PEFT model, in place.

    For each adapted `Linear4bit` layer, the full-precision weight W is read lazily from `model_path`, the 4-bit
    weight Q is dequantized, and the adapters are set to the rank-r SVD of the quantization error W - Q, so that
    base + adapter starts closer to the full-precision model (Li et al., 2023, https://arxiv.org/abs/2310.08659).

    Hand-written rather than `peft.replace_lora_weights_loftq` for two reasons: PEFT 0.21 computes on
    `"cuda"`/`"xpu"` unconditionally (so it cannot run on CPU), and it ignores the LoRA scaling `alpha / r`
    (peft#1982), so with `lora_alpha != r` its initial adapter over- or under-shoots the error. Here the SVD factors
    are divided by `sqrt(scaling)`, so `scaling * B @ A` is the best rank-r approximation of W - Q. Only one step is
    taken: the base is already quantized, so the alternating refinement of the paper (re-quantizing W - BA) does not
    apply.

    Returns:
        `int`: the number of layers initialised.
    """
    import bitsandbytes.functional as bnb_f
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    if model_path is None:
        raise ValueError("LoftQ needs the path of the full-precision base model (loftq_model_path).")
    weights = _SafetensorsWeights(model_path)
    base = peft_model.get_base_model()
    prefix = getattr(base, "base_model_prefix", None)
    count = 0
    for name, module in base.named_modules():
        if not isinstance(module, LoraLinear4bit) or adapter_name not in module.lora_A:
            continue
        qweight = module.get_base_layer().weight
        dequantized = bnb_f.dequantize_4bit(qweight.data, qweight.quant_state).float()
        full = weights.get(name + ".weight", prefix).to(device=dequantized.device, dtype=torch.float32)
        if full.shape != dequantized.shape and full.t().shape == dequantized.shape:
            full = full.t()  # GPT-2 Conv1D checkpoints store the weight as (in, out)
        U, S, Vh = torch.linalg.svd(full - dequantized, full_matrices=False)
        rank = module.r[adapter_name]
        root = S[:rank].sqrt() / math.sqrt(module.scaling[adapter_name])
        lora_A = module.lora_A[adapter_name].weight
        lora_B = module.lora_B[adapter_name].weight
        lora_A.data = (root[:, None] * Vh[:rank]).to(lora_A.dtype)
        lora_B.data = (U[:, :rank] * root[None, :]).to(lora_B.dtype)
        count += 1
    if count == 0:
        raise ValueError("LoftQ found no 4-bit LoRA layer (peft Linear4bit) in the model.")
    logger.info(f"LoftQ: initialised {count} LoRA layers from {model_path}")
    return count


# --------------------------------------------------------------------------------------------------------------
# merging
# --------------------------------------------------------------------------------------------------------------
@dataclass
class QLoRAMergeResult:
    """What [`merge_qlora`] wrote and measured."""

    output_dir: str = field(metadata={"help": "Folder of the merged full-precision model."})
    requantized_output_dir: str | None = field(default=None, metadata={"help": "Folder of the re-quantized model."})
    metrics: dict[str, dict[str, float]] = field(
        default_factory=dict,
        metadata={"help": "Eval metrics per variant: adapter_on_quantized_base, merged, requantized."},
    )


def _holds_model(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in _MODEL_FILES + _ADAPTER_FILES)


def _check_output_dir(path: str | os.PathLike, overwrite: bool, argument: str) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{argument}={str(path)!r} is an existing file, not a folder.")
    if _holds_model(path) and not overwrite:
        raise FileExistsError(
            f"{argument}={str(path)!r} already holds a model; refusing to overwrite it. "
            "Pass overwrite=True or choose another folder."
        )
    return path


def _clear_dir(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    dataset,
    *,
    compute_metrics: Callable | None,
    data_collator: Callable | None,
    batch_size: int,
    causal: bool,
) -> dict[str, float]:
    """Mean loss (token-weighted for language models), perplexity and `compute_metrics` of one model.

    A plain loop rather than `Trainer.evaluate`: Trainer refuses purely quantized models (the re-quantized merge)."""
    from transformers import EvalPrediction, default_data_collator

    collate = data_collator or default_data_collator
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    was_training = model.training
    model.eval()
    total_loss, total_weight = 0.0, 0
    all_logits, all_labels = [], []
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = model(**batch)
        labels = batch.get("labels")
        if out.get("loss") is not None and labels is not None:
            weight = int((labels[..., 1:] != -100).sum()) if causal else int(labels.shape[0])
            total_loss += float(out.loss) * weight
            total_weight += weight
        if compute_metrics is not None and labels is not None:
            all_logits.append(out.logits.float().cpu())
            all_labels.append(labels.cpu())
    model.train(was_training)
    metrics: dict[str, float] = {}
    if total_weight:
        metrics["eval_loss"] = total_loss / total_weight
        if causal:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    if compute_metrics is not None and all_logits:
        pred = EvalPrediction(predictions=torch.cat(all_logits).numpy(), label_ids=torch.cat(all_labels).numpy())
        metrics.update(
            {k if k.startswith("eval_") else f"eval_{k}": float(v) for k, v in compute_metrics(pred).items()}
        )
    return metrics


def merge_qlora(
    model_or_adapter_path,
    output_dir: str | os.PathLike,
    *,
    requantize: str | None = None,
    requantized_output_dir: str | os.PathLike | None = None,
    base_model_name_or_path: str | os.PathLike | None = None,
    quantization_config=None,
    dequantize_base: bool = True,
    dtype: str | torch.dtype = torch.bfloat16,
    eval_dataset=None,
    compute_metrics: Callable | None = None,
    data_collator: Callable | None = None,
    eval_batch_size: int = 8,
    overwrite: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> QLoRAMergeResult:
    """Merge a QLoRA adapter into a full-precision copy of its base and save it; optionally re-quantize.

    Merging with PEFT's `merge_and_unload` directly on a 4-bit base re-quantizes the merged weights (the adapter's
    small update is partly rounded away), and merging into the original full-precision weights drops the
    quantization error the adapter learnt to live with. Here the base is re-loaded with the same bitsandbytes
    config, dequantized (`PreTrainedModel.dequantize`), i.e. the exact weights the adapter was trained on, the
    adapter is merged there in float32, and the result is cast to `dtype` and saved. When `eval_dataset` is given,
    the loss / perplexity / `compute_metrics` of the adapter-on-quantized-base model, the merged model (reloaded from
    `output_dir`) and the re-quantized one are measured and returned.

    Args:
        model_or_adapter_path (`PeftModel` or `str`): a trained PEFT model or a folder saved with `save_pretrained`
            (`adapter_config.json`).
        output_dir (`str`): folder for the merged model.
        requantize (`str`, *optional*): `"nf4"` or `"int8"` to also save a bitsandbytes-quantized copy of the
            merged model (for serving) in `requantized_output_dir` (defaults to `<output_dir>-<requantize>`).
        base_model_name_or_path (`str`, *optional*): the base; defaults to the one recorded in the adapter config.
        quantization_config (`BitsAndBytesConfig`, *optional*): the config the base was trained under. Defaults to
            the in-memory model's own config, or for a path to the defaults of [`load_qlora_model`] (NF4, double
            quantization, bf16 compute, heads kept in full precision).
        dequantize_base (`bool`, *optional*, defaults to `True`): merge into the dequantized base. `False` merges
            into the original full-precision weights (the usual LoRA merge; changes the model by the quantization
            error).
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): dtype of the saved merged model.
        eval_dataset (*optional*): rows with `labels`; enables the before/after report.
        compute_metrics (`Callable`, *optional*): `EvalPrediction -> dict`, as for Trainer.
        data_collator (`Callable`, *optional*): defaults to `default_data_collator`.
        eval_batch_size (`int`, *optional*, defaults to 8).
        overwrite (`bool`, *optional*, defaults to `False`): allow writing into folders that already hold a model.
        model_kwargs (`dict`, *optional*): extra `from_pretrained` arguments for the base (`num_labels`, ...).

    Returns:
        [`QLoRAMergeResult`]

    Raises:
        FileExistsError: `output_dir` (or `requantized_output_dir`) already holds a model and `overwrite=False`.
        ValueError: bad `requantize`, or no adapter found.

    Example:

    ```python
    >>> result = merge_qlora(trainer.model, "merged", requantize="nf4", eval_dataset=valid)
    >>> result.metrics["adapter_on_quantized_base"]["eval_perplexity"], result.metrics["merged"]["eval_perplexity"]
    ```
    """
    require_backend("peft", "Merging a QLoRA adapter")
    from peft import PeftConfig, PeftModel

    if requantize not in (None, "nf4", "int8"):
        raise ValueError(f"requantize={requantize!r} is invalid: use None, 'nf4' or 'int8'.")
    if not isinstance(eval_batch_size, int) or eval_batch_size < 1:
        raise ValueError(f"eval_batch_size={eval_batch_size!r} is invalid: it must be a positive integer.")
    out_dtype = _dtype(dtype)
    out = _check_output_dir(output_dir, overwrite, "output_dir")
    req_out = None
    if requantize is not None:
        req_out = _check_output_dir(
            requantized_output_dir or f"{out}-{requantize}", overwrite, "requantized_output_dir"
        )
        require_backend("bitsandbytes", f"Re-quantizing the merged model (requantize={requantize!r})")
    model_kwargs = dict(model_kwargs or {})

    in_memory = None
    tmp = tempfile.TemporaryDirectory(prefix="hf_compress_qlora_")
    try:
        if isinstance(model_or_adapter_path, (str, os.PathLike)):
            adapter_dir = str(model_or_adapter_path)
            if not (Path(adapter_dir) / "adapter_config.json").exists():
                raise ValueError(f"model_or_adapter_path={adapter_dir!r} holds no adapter_config.json.")
            peft_config = PeftConfig.from_pretrained(adapter_dir)
        else:
            in_memory = unwrap_model(model_or_adapter_path)
            if not isinstance(in_memory, PeftModel):
                raise ValueError(
                    f"model_or_adapter_path must be a PeftModel or an adapter folder, got {type(in_memory).__name__}."
                )
            adapter_dir = tmp.name
            in_memory.save_pretrained(adapter_dir)
            peft_config = in_memory.peft_config[in_memory.active_adapter]
            if quantization_config is None:
                quantization_config = getattr(in_memory.get_base_model().config, "quantization_config", None)
        base_path = base_model_name_or_path or peft_config.base_model_name_or_path
        if base_path is None:
            raise ValueError("The adapter records no base model; pass base_model_name_or_path.")
        task = _PEFT_TASK_TO_TASK.get(str(getattr(peft_config.task_type, "value", peft_config.task_type)), None)
        task = task or "feature-extraction"
        auto_cls = _auto_class(task)
        if quantization_config is None and isinstance(model_or_adapter_path, (str, os.PathLike)):
            from transformers import AutoConfig

            require_backend("bitsandbytes", "Merging into the dequantized 4-bit base")
            base_config = AutoConfig.from_pretrained(base_path, **model_kwargs)
            quantization_config = _bnb_config(_empty_model(task, base_config))
        device_map = _default_device_map()

        # 1. the full-precision copy of the base: dequantized 4-bit weights (or the original ones)
        if dequantize_base and quantization_config is not None:
            base = auto_cls.from_pretrained(
                base_path,
                quantization_config=quantization_config,
                dtype=torch.float32,
                device_map=device_map,
                **model_kwargs,
            )
            base = base.dequantize()
            for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
                if getattr(base, flag, False):
                    setattr(base, flag, False)
        else:
            base = auto_cls.from_pretrained(base_path, dtype=torch.float32, device_map=device_map, **model_kwargs)
        # 2. merge in float32, cast, save
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged = merged.to(out_dtype)
        _clear_dir(out)
        merged.save_pretrained(out)
        _save_tokenizer(adapter_dir, base_path, out)
        del merged, base
        logger.info(f"merge_qlora: merged model saved to {out}")

        # 3. optional re-quantization of the merged model
        if requantize is not None:
            from transformers import AutoConfig

            skeleton = _empty_model(task, AutoConfig.from_pretrained(out))
            qconfig = _bnb_config(skeleton, load_in_8bit=requantize == "int8")
            requantized = auto_cls.from_pretrained(out, quantization_config=qconfig, device_map=device_map)
            _clear_dir(req_out)
            requantized.save_pretrained(req_out)
            _save_tokenizer(adapter_dir, base_path, req_out)
            del requantized
            logger.info(f"merge_qlora: {requantize} copy of the merged model saved to {req_out}")

        # 4. before/after report
        metrics: dict[str, dict[str, float]] = {}
        if eval_dataset is not None:
            eval_kwargs = dict(
                compute_metrics=compute_metrics,
                data_collator=data_collator,
                batch_size=eval_batch_size,
                causal=task == "causal-lm",
            )
            if in_memory is not None:
                reference = in_memory
            else:
                qbase = auto_cls.from_pretrained(
                    base_path, quantization_config=quantization_config, device_map=device_map, **model_kwargs
                )
                reference = PeftModel.from_pretrained(qbase, adapter_dir)
            metrics["adapter_on_quantized_base"] = _evaluate(reference, eval_dataset, **eval_kwargs)
            del reference
            merged_back = auto_cls.from_pretrained(out, device_map=device_map)
            metrics["merged"] = _evaluate(merged_back, eval_dataset, **eval_kwargs)
            del merged_back
            if req_out is not None:
                requantized_back = auto_cls.from_pretrained(req_out, device_map=device_map)
                metrics["requantized"] = _evaluate(requantized_back, eval_dataset, **eval_kwargs)
            logger.info(f"merge_qlora: eval metrics {metrics}")
    finally:
        tmp.cleanup()
    return QLoRAMergeResult(
        output_dir=str(out), requantized_output_dir=str(req_out) if req_out else None, metrics=metrics
    )


def _save_tokenizer(adapter_dir: str, base_path, output_dir: Path) -> None:
    from transformers import AutoTokenizer

    for source in (adapter_dir, base_path):
        try:
            AutoTokenizer.from_pretrained(source).save_pretrained(output_dir)
            return
        except Exception:  # no tokenizer there (tiny test models, adapters saved without one): try the next
            continue
    logger.info("merge_qlora: no tokenizer found next to the adapter or the base; saving the model only.")
