"""Quantization-aware training on torchao's fake quantization: prepare, convert, and save for `from_pretrained`."""

from __future__ import annotations

import os
import tempfile

import torch
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


def _fake_quantized_prototype(module: nn.Linear, base_config) -> nn.Module:
    """torchao's fake-quantized version of a Linear shaped like `module`, built on the meta device (no weights)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig as TorchaoQATConfig

    with torch.device("meta"):
        holder = nn.Sequential(nn.Linear(module.in_features, module.out_features, bias=module.bias is not None))
    quantize_(holder, TorchaoQATConfig(base_config, step="prepare"))
    return holder[0]


def _can_fake_quantize_in_place(module: nn.Module) -> bool:
    # An exact nn.Linear whose forward is the class's (accelerate's offload hooks replace the instance's forward).
    return type(module) is nn.Linear and "forward" not in module.__dict__


def _fake_quantize_in_place_(module: nn.Linear, prototype: nn.Module) -> None:
    """Turn `module` itself into the fake-quantized class of `prototype`, with `prototype`'s fake quantizers.

    The module object, its `weight` / `bias` `Parameter`s and every hook on it stay as they are: FSDP2 unshards
    parameters into the module objects it recorded when sharding, and DeepSpeed ZeRO-3 gathers them in hooks on
    those objects, so a new module swapped in after sharding (what `quantize_` does) would see shards or empty
    partitions. torchao's own class and fake quantizers do the work; only the swap is done in place.
    """
    module.__class__ = type(prototype)
    for name, child in prototype._modules.items():
        module._modules[name] = child
    for name, value in vars(prototype).items():
        if not name.startswith("_") and name not in vars(module) and name not in ("training",):
            setattr(module, name, value)


def _unfake_quantize_in_place_(module: nn.Module) -> None:
    """Undo [`_fake_quantize_in_place_`]: `module` becomes a plain `nn.Linear` again (same object, same weights)."""
    for name in ("activation_fake_quantizer", "weight_fake_quantizer"):
        module._modules.pop(name, None)
        module.__dict__.pop(name, None)
    module.__class__ = nn.Linear


def prepare_qat_(model: nn.Module, config: QATConfig | None = None) -> list[str]:
    """Insert torchao fake quantization into the targeted Linear layers of `model`, in place.

    Each targeted `nn.Linear` becomes a `torchao.quantization.qat.FakeQuantizedLinear` *in place*: the same module
    object, with torchao's fake quantizers attached and its `weight` and `bias` `Parameter`s untouched, so an
    optimizer built before this call keeps updating them, and the layers of a model already sharded by FSDP2
    (`fully_shard`) or partitioned by DeepSpeed ZeRO-3 keep working (fake quantization can start at any step of such
    a run). Layers that are not exact `nn.Linear` modules, or whose `forward` was replaced on the instance, are
    swapped for new `FakeQuantizedLinear` modules sharing the same parameters (torchao's `quantize_`).

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
    base_config = config.to_torchao_base_config()
    swapped = set()
    for name, module in selected.items():
        if _can_fake_quantize_in_place(module):
            _fake_quantize_in_place_(module, _fake_quantized_prototype(module, base_config))
        else:
            swapped.add(name)
    if swapped:
        quantize_(
            model,
            TorchaoQATConfig(base_config, step="prepare"),
            filter_fn=lambda module, fqn: fqn in swapped and isinstance(module, nn.Linear),
        )
    logger.info(f"QAT ({config.scheme}, group_size={config.group_size}): fake-quantized {len(names)} Linear layers.")
    return sorted(already | names)


def convert_qat_(model: nn.Module, config: QATConfig | None = None) -> list[str]:
    """Remove fake quantization from `model`, in place; with a `config`, also quantize those layers for real.

    Without `config`, every `FakeQuantizedLinear` goes back to a plain `nn.Linear` holding the (QAT-trained) float
    weights (the same module objects, so a sharded FSDP2 / ZeRO-3 model keeps working): the model saves and loads
    like any transformers model. With `config`, torchao then replaces the weights by real integer tensors (torchao
    tensor subclasses), for inference in memory. A model quantized in memory this way does not round-trip through
    `save_pretrained` / `from_pretrained`: use [`save_qat_model`] to write a checkpoint that stock `from_pretrained`
    loads.

    Args:
        model (`nn.Module`): a model prepared with [`prepare_qat_`].
        config ([`QATConfig`], *optional*): the scheme used in `prepare_qat_`; `None` only removes fake quantization.

    Returns:
        `list[str]`: the qualified names of the converted layers.
    """
    require_backend("torchao", "Converting a quantization-aware-trained model")
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear
    from torchao.quantization.qat import QATConfig as TorchaoQATConfig

    model = unwrap_model(model)
    names = set(fake_quantized_module_names(model))
    if not names:
        logger.warning("convert_qat_: the model holds no fake-quantized layer; nothing to convert.")
        return []
    swapped = set()
    for name, module in model.named_modules():
        if name not in names:
            continue
        if type(module) is FakeQuantizedLinear and "forward" not in module.__dict__:
            _unfake_quantize_in_place_(module)
        else:
            swapped.add(name)
    if swapped:  # layers torchao swapped in (or other fake-quantized classes): torchao swaps them back
        quantize_(model, TorchaoQATConfig(None, step="convert"), filter_fn=lambda module, fqn: fqn in swapped)
    if config is not None:
        quantize_(model, config.to_torchao_base_config(), filter_fn=lambda module, fqn: fqn in names)
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
