"""Structured pruning that physically shrinks a model: FFN neurons, query heads (Llama family) and whole layers.

Unlike masks (`prune_`), the removed rows, columns and blocks are gone: the model gets smaller and faster, its config
is updated, and `save_pretrained` / `from_pretrained` with stock transformers load the smaller architecture.

The slicing is hand-written (see `hf_compress.utils.surgery`): transformers 5 dropped `prune_heads`, and no
maintained library removes structure from Hugging Face models so that they still load with `from_pretrained`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..utils.modules import count_parameters, unwrap_model
from ..utils.surgery import (
    ModelStructure,
    evenly_spaced_indices,
    get_head_dim,
    get_intermediate_size,
    get_model_structure,
    get_num_key_value_heads,
    keep_strongest_ffn_neurons_,
    prune_query_heads_,
    query_head_importance,
    renumber_layers_,
    select_heads_per_group,
    subset_per_layer_config_,
    validate_config_change,
)
from ..utils.validation import check_choice, check_int, check_int_list, check_number

logger = logging.get_logger(__name__)

_IMPORTANCE = ("l2", "l1", "activation")
_LAYER_IMPORTANCE = ("evenly_spaced", "block_influence")


@dataclass
class StructuredPruningConfig:
    """What structured pruning removes, and how it picks what to remove.

    The three kinds of structure can be combined; they are applied in the order layers, heads, FFN neurons. Every
    field is checked here; what depends on the model (sizes, divisibility) is checked by [`structured_prune_`]
    before anything is changed.

    Args:
        ffn_pruning_ratio (`float`, *optional*, defaults to `0.0`):
            Fraction of the FFN intermediate neurons to remove in every layer, in [0, 1). The new width is
            `round(intermediate_size * (1 - ffn_pruning_ratio))`, the same in every layer (transformers configs hold
            one `intermediate_size` for all layers).
        target_intermediate_size (`int`, *optional*):
            The FFN width to prune to, instead of `ffn_pruning_ratio`.
        num_heads_to_prune (`int`, *optional*, defaults to `0`):
            Query heads to remove per layer (Llama family only: models with an explicit `head_dim`). The removed
            heads are spread evenly over the key/value groups, so the count must keep `num_attention_heads` a
            multiple of `num_key_value_heads`.
        target_num_heads (`int`, *optional*): the number of query heads to keep, instead of `num_heads_to_prune`.
        layers_to_drop (`list[int]`, *optional*): indices of the transformer blocks to remove.
        num_layers_to_drop (`int`, *optional*, defaults to `0`):
            Number of blocks to remove, chosen by `layer_importance`, instead of `layers_to_drop`.
        importance (`str`, *optional*, defaults to `"l2"`):
            How neurons and heads are scored: `"l2"` / `"l1"` (magnitude: product of the norms of the weights a neuron
            or head reads and writes) or `"activation"` (norm of its activations on `calibration_data` times the
            norm of its output weights, as in Wanda, Sun et al. 2023). The lowest-scored are removed.
        layer_importance (`str`, *optional*, defaults to `"evenly_spaced"`):
            How `num_layers_to_drop` blocks are chosen: `"evenly_spaced"` keeps layers `(i * L) // (L - n)` (for
            12 -> 6: 0, 2, 4, ..., 10); `"block_influence"` removes the blocks whose output hidden state is most
            similar (cosine) to their input on `calibration_data` (ShortGPT, Men et al. 2024).
        num_calibration_batches (`int`, *optional*, defaults to `8`): calibration batches used at most.

    Example:

    >>> from hf_compress import StructuredPruningConfig, structured_prune_
    >>> config = StructuredPruningConfig(ffn_pruning_ratio=0.5, num_layers_to_drop=2)
    >>> model = structured_prune_(model, config)  # doctest: +SKIP
    >>> model.save_pretrained("pruned")  # doctest: +SKIP
    """

    ffn_pruning_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of FFN intermediate neurons removed in every layer, in [0, 1)."}
    )
    target_intermediate_size: int | None = field(
        default=None, metadata={"help": "FFN width to prune to (instead of ffn_pruning_ratio)."}
    )
    num_heads_to_prune: int = field(
        default=0, metadata={"help": "Query heads removed per layer (Llama family only), evenly over KV groups."}
    )
    target_num_heads: int | None = field(
        default=None, metadata={"help": "Query heads kept per layer (instead of num_heads_to_prune)."}
    )
    layers_to_drop: list[int] | None = field(
        default=None, metadata={"help": "Indices of the transformer blocks to remove."}
    )
    num_layers_to_drop: int = field(
        default=0, metadata={"help": "Number of transformer blocks to remove, chosen by layer_importance."}
    )
    importance: str = field(
        default="l2", metadata={"help": f"Neuron/head score, one of {_IMPORTANCE}; 'activation' needs calibration."}
    )
    layer_importance: str = field(
        default="evenly_spaced",
        metadata={"help": f"How blocks are chosen, one of {_LAYER_IMPORTANCE}; 'block_influence' needs calibration."},
    )
    num_calibration_batches: int = field(default=8, metadata={"help": "Calibration batches used at most (>= 1)."})

    def __post_init__(self):
        self.ffn_pruning_ratio = check_number(
            "ffn_pruning_ratio", self.ffn_pruning_ratio, low=0.0, high=1.0, high_inclusive=False
        )
        self.target_intermediate_size = check_int(
            "target_intermediate_size", self.target_intermediate_size, low=1, allow_none=True
        )
        if self.target_intermediate_size is not None and self.ffn_pruning_ratio > 0:
            raise ValueError(
                f"give either ffn_pruning_ratio ({self.ffn_pruning_ratio}) or target_intermediate_size "
                f"({self.target_intermediate_size}), not both"
            )
        self.num_heads_to_prune = check_int("num_heads_to_prune", self.num_heads_to_prune, low=0)
        self.target_num_heads = check_int("target_num_heads", self.target_num_heads, low=1, allow_none=True)
        if self.target_num_heads is not None and self.num_heads_to_prune > 0:
            raise ValueError(
                f"give either num_heads_to_prune ({self.num_heads_to_prune}) or target_num_heads "
                f"({self.target_num_heads}), not both"
            )
        self.num_layers_to_drop = check_int("num_layers_to_drop", self.num_layers_to_drop, low=0)
        layers = check_int_list("layers_to_drop", self.layers_to_drop, low=0)
        if layers is not None:
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers_to_drop has repeated indices: {self.layers_to_drop!r}")
            if self.num_layers_to_drop > 0:
                raise ValueError(
                    f"give either layers_to_drop ({self.layers_to_drop}) or num_layers_to_drop "
                    f"({self.num_layers_to_drop}), not both"
                )
            self.layers_to_drop = sorted(layers)
        check_choice("importance", self.importance, _IMPORTANCE)
        check_choice("layer_importance", self.layer_importance, _LAYER_IMPORTANCE)
        self.num_calibration_batches = check_int("num_calibration_batches", self.num_calibration_batches, low=1)

    @property
    def prunes_ffn(self) -> bool:
        return self.ffn_pruning_ratio > 0 or self.target_intermediate_size is not None

    @property
    def prunes_heads(self) -> bool:
        return self.num_heads_to_prune > 0 or self.target_num_heads is not None

    @property
    def drops_layers(self) -> bool:
        return bool(self.layers_to_drop) or self.num_layers_to_drop > 0

    @property
    def needs_calibration(self) -> bool:
        uses_scores = self.prunes_ffn or self.prunes_heads
        return (self.importance == "activation" and uses_scores) or (
            self.num_layers_to_drop > 0 and self.layer_importance == "block_influence"
        )


@dataclass
class _Plan:
    keep_layers: list[int]
    intermediate_size: int | None
    num_heads: int | None


def _plan(
    model: nn.Module, structure: ModelStructure, config: StructuredPruningConfig, has_calibration: bool
) -> _Plan:
    model_config = model.config
    layout = structure.layout
    num_layers = len(structure.layers)
    if config.needs_calibration and not has_calibration:
        raise ValueError(
            f"calibration_data is required for importance={config.importance!r} / "
            f"layer_importance={config.layer_importance!r}; pass a few batches (dicts of input tensors)."
        )

    keep_layers = list(range(num_layers))
    if config.layers_to_drop:
        bad = [i for i in config.layers_to_drop if i >= num_layers]
        if bad:
            raise ValueError(f"layers_to_drop: indices {bad} are out of range for a model with {num_layers} layers")
        if len(config.layers_to_drop) >= num_layers:
            raise ValueError(f"layers_to_drop removes all {num_layers} layers; keep at least one")
        keep_layers = [i for i in keep_layers if i not in set(config.layers_to_drop)]
    elif config.num_layers_to_drop > 0:
        if config.num_layers_to_drop >= num_layers:
            raise ValueError(
                f"num_layers_to_drop={config.num_layers_to_drop} must be < the model's {num_layers} layers"
            )
        if config.layer_importance == "evenly_spaced":
            keep_layers = evenly_spaced_indices(num_layers, num_layers - config.num_layers_to_drop)
        else:
            keep_layers = []  # decided after calibration

    intermediate_size = None
    if config.prunes_ffn:
        current = get_intermediate_size(model_config, layout)
        if config.target_intermediate_size is not None:
            intermediate_size = config.target_intermediate_size
            if intermediate_size > current:
                raise ValueError(
                    f"target_intermediate_size={intermediate_size} exceeds the model's intermediate size {current}"
                )
        else:
            intermediate_size = round(current * (1.0 - config.ffn_pruning_ratio))
            if intermediate_size < 1:
                raise ValueError(
                    f"ffn_pruning_ratio={config.ffn_pruning_ratio} leaves no neuron of intermediate size {current}"
                )

    num_heads = None
    if config.prunes_heads:
        argument = "target_num_heads" if config.target_num_heads is not None else "num_heads_to_prune"
        if not layout.explicit_head_dim:
            raise ValueError(
                f"{argument}: removing attention heads is supported for Llama-family models only. "
                f"{type(model).__name__} computes head_dim = hidden_size / num_attention_heads in transformers 5 "
                "(no pruned_heads, no per-head config), so fewer heads cannot be saved without changing the shape "
                "of every head. Use create_student(num_heads=...) to re-partition heads, or prune FFN neurons/layers."
            )
        current = model_config.num_attention_heads
        num_kv = get_num_key_value_heads(model_config)
        num_heads = (
            config.target_num_heads if config.target_num_heads is not None else current - config.num_heads_to_prune
        )
        if not 1 <= num_heads <= current:
            raise ValueError(f"{argument}: the model has {current} query heads per layer; {num_heads} would remain")
        if num_heads % num_kv != 0:
            raise ValueError(
                f"{argument}: {num_heads} remaining query heads is not a multiple of num_key_value_heads={num_kv} "
                f"(every key/value group must keep the same number of query heads)"
            )
        validate_config_change(
            model_config, argument, num_attention_heads=num_heads, head_dim=get_head_dim(model_config)
        )
    return _Plan(keep_layers=keep_layers, intermediate_size=intermediate_size, num_heads=num_heads)


def _iterate_batches(calibration_data: Any, limit: int) -> Iterable[Mapping[str, Any]]:
    if isinstance(calibration_data, Mapping):
        calibration_data = [calibration_data]
    for i, batch in enumerate(calibration_data):
        if i >= limit:
            return
        if not isinstance(batch, Mapping):
            raise ValueError(
                f"calibration_data must yield dicts of model inputs (e.g. a DataLoader), got {type(batch).__name__}"
            )
        yield batch


@torch.no_grad()
def _collect_statistics(
    model: nn.Module, structure: ModelStructure, calibration_data: Any, config: StructuredPruningConfig
) -> dict[str, list[Any]]:
    """One pass over the calibration batches: per layer, the squared activations entering the FFN output projection
    and the attention output projection, and the mean `1 - cos(input, output)` of the block (its influence)."""
    layout = structure.layout
    need_ffn = config.importance == "activation" and config.prunes_ffn
    need_heads = config.importance == "activation" and config.prunes_heads
    need_layers = config.num_layers_to_drop > 0 and config.layer_importance == "block_influence"
    num_layers = len(structure.layers)
    stats: dict[str, list[Any]] = {
        "ffn": [None] * num_layers,
        "heads": [None] * num_layers,
        "influence": [0.0] * num_layers,
        "tokens": [0] * num_layers,
    }

    def accumulate(key: str, idx: int):
        def hook(_module, args):
            x = args[0].detach().float()
            sq = x.pow(2).reshape(-1, x.shape[-1]).sum(0)
            stats[key][idx] = sq if stats[key][idx] is None else stats[key][idx] + sq

        return hook

    def influence(idx: int):
        def hook(_module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            hidden_out = output[0] if isinstance(output, (tuple, list)) else output
            if not torch.is_tensor(hidden_in) or not torch.is_tensor(hidden_out):
                return
            cos = nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            stats["influence"][idx] += float((1.0 - cos).sum())
            stats["tokens"][idx] += cos.numel()

        return hook

    handles = []
    for idx, block in enumerate(structure.layers):
        if need_ffn:
            handles.append(block.get_submodule(layout.ffn_out).register_forward_pre_hook(accumulate("ffn", idx)))
        if need_heads:
            module = block.get_submodule(layout.attn_output)
            handles.append(module.register_forward_pre_hook(accumulate("heads", idx)))
        if need_layers:
            handles.append(block.register_forward_hook(influence(idx), with_kwargs=True))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seen = 0
    try:
        for batch in _iterate_batches(calibration_data, config.num_calibration_batches):
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
            inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
            if torch.is_tensor(inputs.get("input_ids")) and inputs["input_ids"].dim() == 1:  # one unbatched row
                inputs = {k: (v.unsqueeze(0) if torch.is_tensor(v) else v) for k, v in inputs.items()}
            model(**inputs)
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibration_data yielded no batch")
    return stats


@torch.no_grad()
def _apply_plan_(model, structure, config, num_heads, intermediate_size, keep_layers, stats) -> None:
    """Remove the planned query heads, FFN neurons and layers of `model` and update its config, in place."""
    layout, model_config = structure.layout, model.config
    num_layers = len(structure.layers)
    head_dim = get_head_dim(model_config)
    if num_heads is not None and num_heads != model_config.num_attention_heads:
        num_kv = get_num_key_value_heads(model_config)
        for idx in keep_layers:
            block = structure.layers[idx]
            act = stats["heads"][idx].sqrt() if stats is not None and stats["heads"][idx] is not None else None
            norm = "l2" if config.importance == "activation" else config.importance
            scores = query_head_importance(block, layout, head_dim, norm=norm, activation_norms=act)
            keep = select_heads_per_group(model_config.num_attention_heads, num_kv, num_heads // num_kv, scores)
            prune_query_heads_(block, layout, keep, head_dim, num_kv)
        model_config.head_dim = head_dim  # explicit, so hidden_size / num_attention_heads is never used
        model_config.num_attention_heads = num_heads

    if intermediate_size is not None and intermediate_size != get_intermediate_size(model_config, layout):
        for idx in keep_layers:
            block = structure.layers[idx]
            act = stats["ffn"][idx].sqrt() if stats is not None and stats["ffn"][idx] is not None else None
            norm = "l2" if config.importance == "activation" else config.importance
            keep_strongest_ffn_neurons_(block, layout, intermediate_size, norm=norm, activation_norms=act)
        setattr(model_config, layout.intermediate_config_key, intermediate_size)

    if keep_layers != list(range(num_layers)):
        kept = nn.ModuleList([structure.layers[i] for i in keep_layers])
        setattr(structure.parent, structure.attr, kept)
        renumber_layers_(kept)
        if getattr(model_config, "scale_attn_by_inverse_layer_idx", False):
            logger.warning("scale_attn_by_inverse_layer_idx=True: kept layers are rescaled by their new index")
        subset_per_layer_config_(model_config, keep_layers, num_layers)


def structured_prune_(
    model: nn.Module, config: StructuredPruningConfig, calibration_data: Any | None = None
) -> nn.Module:
    """Physically remove FFN neurons, query heads and/or whole layers from `model`, in place.

    Supports BERT/RoBERTa (and BERT-like encoders), DistilBERT, GPT-2 and the Llama family (Llama, Qwen2, Mistral
    and others with `self_attn.{q,k,v,o}_proj` / `mlp.{gate,up,down}_proj`); heads only for the Llama family.
    `model.config` is updated (`num_hidden_layers`, `layer_types`, the FFN width field, `num_attention_heads` and an
    explicit `head_dim`), so `save_pretrained` + stock `from_pretrained` load the pruned model. Every check runs
    before the model is touched. Call it before building the optimizer (e.g. between Trainer runs): parameters are
    replaced, so an existing optimizer would keep the old ones.

    Args:
        model (`PreTrainedModel`): the model (DDP / compile wrappers are looked through).
        config ([`StructuredPruningConfig`]): what to remove.
        calibration_data (`Iterable[dict]` or `dict`, *optional*):
            Batches of model inputs (a `DataLoader`, a list of dicts, or one dict); `labels` are ignored. Needed
            for `importance="activation"` and `layer_importance="block_influence"`.

    Returns:
        The same `model`, smaller. Parameter counts before/after are logged at INFO level.

    Example:

    >>> cfg = StructuredPruningConfig(target_intermediate_size=1024, layers_to_drop=[3, 7])
    >>> model = structured_prune_(model, cfg)  # doctest: +SKIP
    """
    if not isinstance(config, StructuredPruningConfig):
        raise ValueError(f"config must be a StructuredPruningConfig, got {type(config).__name__}")
    returned = model
    model = unwrap_model(model)
    structure = get_model_structure(model)
    layout = structure.layout
    model_config = model.config
    plan = _plan(model, structure, config, has_calibration=calibration_data is not None)
    stats = _collect_statistics(model, structure, calibration_data, config) if config.needs_calibration else None
    params_before = count_parameters(model)[0]
    num_layers = len(structure.layers)

    keep_layers = plan.keep_layers
    if not keep_layers:  # block influence: drop the blocks that change their input the least
        scores = torch.tensor([s / max(t, 1) for s, t in zip(stats["influence"], stats["tokens"])])
        drop = set(torch.argsort(scores, stable=True)[: config.num_layers_to_drop].tolist())
        keep_layers = [i for i in range(num_layers) if i not in drop]
        logger.info(f"block influence per layer: {[round(float(s), 5) for s in scores]}")

    _apply_plan_(model, structure, config, plan.num_heads, plan.intermediate_size, keep_layers, stats)

    params_after = count_parameters(model)[0]
    logger.info(
        f"structured pruning of {type(model).__name__}: {params_before:,} -> {params_after:,} parameters "
        f"({params_after / params_before:.1%}); layers kept {keep_layers}, "
        f"intermediate size {get_intermediate_size(model_config, layout)}, "
        f"{model_config.num_attention_heads} attention heads"
    )
    return returned
