"""Which Linear layers get LoRA adapters: discovered from the architecture, named the way PEFT's `target_modules`
accepts."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers.utils import logging

from ..utils import find_linear_modules, unwrap_model
from ..utils import validation as _validation
from ..utils.modules import LINEAR_TYPES

logger = logging.get_logger(__name__)


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)]


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
    _validation.check_find_lora_target_modules_arguments(model, target_modules, exclude_modules)
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


__all__ = ["find_lora_target_modules"]
