"""Quantization-aware training on torchao's fake quantization: prepare, convert, and save for `from_pretrained`."""

from __future__ import annotations

import os
import tempfile

from torch import nn
from transformers.utils import logging

from ..utils import find_linear_modules, require_backend, unwrap_model
from ..utils.modules import LINEAR_TYPES
from ..utils.output import check_output_dir, prepare_output_dir
from .config import QATConfig

logger = logging.get_logger(__name__)


def _fake_quantized_linear_types() -> tuple[type[nn.Module], ...]:
    from torchao.quantization.qat import FakeQuantizedLinear

    return (FakeQuantizedLinear,)


def fake_quantized_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the layers that currently carry torchao fake quantization."""
    if not _torchao_importable():
        return []
    types = _fake_quantized_linear_types()
    return [name for name, module in unwrap_model(model).named_modules() if isinstance(module, types)]


def _torchao_importable() -> bool:
    from ..utils import is_torchao_available

    return is_torchao_available()


def select_qat_modules(model: nn.Module, config: QATConfig) -> dict[str, nn.Linear]:
    """The `nn.Linear` layers `config` targets, after checking that `group_size` divides each one's `in_features`.

    Raises:
        ValueError: when the selection is empty, holds layers torchao cannot fake-quantize (GPT-2 `Conv1D`), or a
            layer's `in_features` is not a multiple of `group_size` (the error names the layer).
    """
    selected = find_linear_modules(model, config.target_modules, config.exclude_modules)
    # torchao's QAT swaps nn.Linear only; transformers' Conv1D (GPT-2) would be silently skipped, so refuse it.
    unsupported = sorted(n for n, m in selected.items() if not isinstance(m, nn.Linear))
    if unsupported:
        raise ValueError(
            f"QAT (torchao fake quantization) supports nn.Linear layers only, but the selection holds "
            f"{type(selected[unsupported[0]]).__name__} layers ({', '.join(unsupported[:3])}, ...). Use a model "
            "with nn.Linear projections (Llama, BERT, ...) or exclude these with exclude_modules."
        )
    if config.group_size is not None:
        for name, module in selected.items():
            if module.in_features % config.group_size != 0:
                raise ValueError(
                    f"group_size={config.group_size} does not divide in_features={module.in_features} of layer "
                    f"{name!r}: pick a group_size that divides every targeted layer's input width, or exclude "
                    "that layer with exclude_modules."
                )
    return selected


def prepare_qat_(model: nn.Module, config: QATConfig | None = None) -> list[str]:
    """Insert torchao fake quantization into the targeted Linear layers of `model`, in place.

    Each targeted `nn.Linear` becomes a `torchao.quantization.qat.FakeQuantizedLinear` that *shares* the original
    `weight` and `bias` `Parameter` objects, so an optimizer built before this call keeps updating them.

    Args:
        model (`nn.Module`): the model (DDP / compile wrappers are looked through).
        config ([`QATConfig`], *optional*): scheme and layers; defaults to `QATConfig()` (8da4w, group size 32).

    Returns:
        `list[str]`: the qualified names of the fake-quantized layers.

    Example:

    ```python
    >>> from hf_compress import QATConfig, prepare_qat_
    >>> names = prepare_qat_(model, QATConfig(scheme="int4-weight-only", group_size=32))  # doctest: +SKIP
    ```
    """
    require_backend("torchao", "Quantization-aware training")
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig as TorchaoQATConfig

    config = config if config is not None else QATConfig()
    model = unwrap_model(model)
    already = set(fake_quantized_module_names(model))
    # FakeQuantizedLinear subclasses nn.Linear, so a prepared model selects the same layers again: skip those.
    selected = {n: m for n, m in select_qat_modules(model, config).items() if n not in already}
    if not selected:
        return sorted(already)
    names = set(selected)
    quantize_(
        model,
        TorchaoQATConfig(config.to_torchao_base_config(), step="prepare"),
        filter_fn=lambda module, fqn: fqn in names and isinstance(module, nn.Linear),
    )
    logger.info(f"QAT ({config.scheme}, group_size={config.group_size}): fake-quantized {len(names)} Linear layers.")
    return sorted(already | names)


def convert_qat_(model: nn.Module, config: QATConfig | None = None) -> list[str]:
    """Remove fake quantization from `model`, in place; with a `config`, also quantize those layers for real.

    Without `config`, every `FakeQuantizedLinear` goes back to a plain `nn.Linear` holding the (QAT-trained) float
    weights: the model saves and loads like any transformers model. With `config`, torchao then replaces the
    weights by real integer tensors (torchao tensor subclasses), for inference in memory. A model quantized in memory
    this way does not round-trip through `save_pretrained` / `from_pretrained`: use [`save_qat_model`] to write a
    checkpoint that stock `from_pretrained` loads.

    Args:
        model (`nn.Module`): a model prepared with [`prepare_qat_`].
        config ([`QATConfig`], *optional*): the scheme used in `prepare_qat_`; `None` only removes fake quantization.

    Returns:
        `list[str]`: the qualified names of the converted layers.
    """
    require_backend("torchao", "Converting a quantization-aware-trained model")
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig as TorchaoQATConfig

    model = unwrap_model(model)
    names = set(fake_quantized_module_names(model))
    if not names:
        logger.warning("convert_qat_: the model holds no fake-quantized layer; nothing to convert.")
        return []
    base_config = config.to_torchao_base_config() if config is not None else None
    quantize_(
        model,
        TorchaoQATConfig(base_config, step="convert"),
        filter_fn=lambda module, fqn: fqn in names,
    )
    return sorted(names)


def save_qat_model(
    model: nn.Module,
    output_dir: str | os.PathLike,
    config: QATConfig | None = None,
    *,
    processing_class=None,
    overwrite: bool = False,
    quantized_module_names: list[str] | None = None,
):
    """Write the real quantized version of a QAT model to `output_dir`, loadable with plain `from_pretrained`.

    The route (transformers >= 5 with torchao): fake quantization is removed (QAT `step="convert"` without a base
    config, leaving plain `nn.Linear` layers with the trained float weights, in place on `model`), the float weights
    are saved to a temporary folder, reloaded with `quantization_config=TorchAoConfig(base_config)` so torchao
    quantizes exactly the layers trained with fake quantization, and that model is saved with `save_pretrained`.
    Its logits equal those of the model converted in memory with `convert_qat_(model, config)`. (A model converted
    in memory and saved directly does not reload on this stack, hence the round trip.)

    Args:
        model (`transformers.PreTrainedModel`): a model prepared with [`prepare_qat_`] (or already converted back to
            plain Linear layers, in which case `config`'s targets decide which layers are quantized).
        output_dir (`str` or `os.PathLike`): where to write the quantized checkpoint.
        config ([`QATConfig`], *optional*): the scheme trained with; defaults to `QATConfig()`.
        processing_class (*optional*): a tokenizer / processor saved alongside.
        overwrite (`bool`, *optional*, defaults to `False`): allow writing into a non-empty `output_dir`.
        quantized_module_names (`list[str]`, *optional*): the layers to quantize; defaults to the fake-quantized
            layers of `model`, or to `config`'s selection if there are none.

    Returns:
        `transformers.PreTrainedModel`: the quantized model, as loaded from the float weights (on CPU).
    """
    require_backend("torchao", "Saving a quantization-aware-trained model")
    from transformers import PreTrainedModel, TorchAoConfig

    config = config if config is not None else QATConfig()
    model = unwrap_model(model)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"save_qat_model needs a transformers PreTrainedModel (to reload it with TorchAoConfig), got "
            f"{type(model).__name__}."
        )
    output_dir = check_output_dir(output_dir, overwrite)

    names = quantized_module_names or fake_quantized_module_names(model)
    if not names:
        names = sorted(select_qat_modules(model, config))
    if fake_quantized_module_names(model):
        convert_qat_(model)
    # Every other Linear keeps full precision; transformers matches these names as prefixes/suffixes of parameters.
    keep = sorted(n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and n not in set(names))

    with tempfile.TemporaryDirectory(prefix="hf_compress_qat_") as tmp:
        model.save_pretrained(tmp)
        quantized = type(model).from_pretrained(
            tmp,
            quantization_config=TorchAoConfig(config.to_torchao_base_config(), modules_to_not_convert=keep),
            dtype=model.dtype,
            device_map="cpu",
        )
    prepare_output_dir(output_dir, overwrite)
    quantized.save_pretrained(output_dir)
    if processing_class is not None:
        processing_class.save_pretrained(output_dir)
    logger.info(f"Saved the {config.scheme} quantized model ({len(names)} layers quantized) to {output_dir}.")
    return quantized
