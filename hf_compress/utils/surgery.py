"""Model surgery shared by structured pruning and student creation: finding the transformer blocks of a model,
slicing Linear / GPT-2 `Conv1D` layers, removing FFN neurons and query heads, renumbering layers.

Everything here is hand-written: transformers 5 removed `prune_heads` / `find_pruneable_heads_and_indices`, and no
maintained library (torch.nn.utils.prune, torchao, peft, accelerate) physically removes rows and columns from
Hugging Face models so that the result still loads with a stock `from_pretrained`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .modules import is_conv1d, unwrap_model

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class BlockLayout:
    """Where the parts of one transformer block live, relative to the block, for one family of architectures.

    Args:
        family (`str`): `"bert"` (BERT, RoBERTa and their derivatives), `"distilbert"`, `"gpt2"` or `"llama"`
            (Llama, Qwen2/3, Mistral, Gemma and every model with `self_attn.{q,k,v,o}_proj` and
            `mlp.{gate,up,down}_proj`).
        markers (`tuple[str]`): sub-modules a block must have to belong to the family.
        ffn_in (`tuple[str]`): the FFN projections into the intermediate space (their output rows are neurons).
        ffn_out (`str`): the FFN projection back to the hidden size (its input columns are neurons).
        intermediate_config_key (`str`): the config field holding the FFN width.
        query (`str`, *optional*): the query projection (families with an explicit `head_dim` only).
        attn_output (`str`, *optional*): the attention output projection (idem).
    """

    family: str
    markers: tuple[str, ...]
    ffn_in: tuple[str, ...]
    ffn_out: str
    intermediate_config_key: str
    query: str | None = None
    attn_output: str | None = None

    @property
    def explicit_head_dim(self) -> bool:
        """Whether query heads can be removed without changing `head_dim` (config has its own `head_dim`)."""
        return self.query is not None


LAYOUTS: tuple[BlockLayout, ...] = (
    BlockLayout(
        family="llama",
        markers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj"),
        ffn_in=("mlp.gate_proj", "mlp.up_proj"),
        ffn_out="mlp.down_proj",
        intermediate_config_key="intermediate_size",
        query="self_attn.q_proj",
        attn_output="self_attn.o_proj",
    ),
    BlockLayout(
        family="bert",
        markers=("attention.self.query", "intermediate.dense", "output.dense"),
        ffn_in=("intermediate.dense",),
        ffn_out="output.dense",
        intermediate_config_key="intermediate_size",
    ),
    BlockLayout(
        family="distilbert",
        markers=("attention.q_lin", "ffn.lin1", "ffn.lin2"),
        ffn_in=("ffn.lin1",),
        ffn_out="ffn.lin2",
        intermediate_config_key="hidden_dim",
    ),
    BlockLayout(
        family="gpt2",
        markers=("attn.c_attn", "mlp.c_fc", "mlp.c_proj"),
        ffn_in=("mlp.c_fc",),
        ffn_out="mlp.c_proj",
        # `n_inner=None` means 4 * hidden; surgery always writes the explicit width.
        intermediate_config_key="n_inner",
    ),
)

SUPPORTED_FAMILIES = (
    "BERT/RoBERTa (and BERT-like encoders), DistilBERT, GPT-2, Llama-family (Llama, Qwen2, Mistral...)"
)


@dataclass
class ModelStructure:
    """The transformer blocks of a model and the layout they follow.

    Args:
        layout (`BlockLayout`): the family layout.
        layers_name (`str`): qualified name of the `nn.ModuleList` of blocks (e.g. `"bert.encoder.layer"`).
        layers (`nn.ModuleList`): the blocks.
        parent (`nn.Module`): the module owning the list; `attr` is its attribute name there.
    """

    layout: BlockLayout
    layers_name: str
    layers: nn.ModuleList
    parent: nn.Module
    attr: str


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def get_model_structure(model: nn.Module) -> ModelStructure:
    """Find the list of transformer blocks of `model` and its [`BlockLayout`].

    Raises:
        ValueError: when the model follows none of the supported layouts.
    """
    model = unwrap_model(model)
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        for layout in LAYOUTS:
            if all(_has_submodule(module[0], marker) for marker in layout.markers):
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                return ModelStructure(layout=layout, layers_name=name, layers=module, parent=parent, attr=attr)
    raise ValueError(
        f"model surgery does not know the layout of {type(model).__name__}: supported are {SUPPORTED_FAMILIES}."
    )


def evenly_spaced_indices(num_total: int, num_keep: int) -> list[int]:
    """Indices of `num_keep` of `num_total` layers, evenly spaced from the first: `[(i * num_total) // num_keep]`.

    For 12 -> 6 this is `[0, 2, 4, 6, 8, 10]` (DistilBERT's "every other layer"), for 12 -> 4 `[0, 3, 6, 9]`,
    for 6 -> 4 `[0, 1, 3, 4]`. The first layer is always kept.
    """
    if not 1 <= num_keep <= num_total:
        raise ValueError(f"num_keep={num_keep} must be in [1, {num_total}]")
    return [(i * num_total) // num_keep for i in range(num_keep)]


def get_intermediate_size(config, layout: BlockLayout) -> int:
    value = getattr(config, layout.intermediate_config_key, None)
    if value is None and layout.family == "gpt2":
        return 4 * config.hidden_size
    return int(value)


def get_head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def get_num_key_value_heads(config) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def _check_sliceable(module: nn.Module, name: str) -> None:
    if not isinstance(module, nn.Linear) and not is_conv1d(module):
        raise ValueError(
            f"{name} is a {type(module).__name__}: structured surgery needs plain nn.Linear / Conv1D layers. "
            "Apply it before quantization or LoRA wrapping (merge adapters first)."
        )
    if hasattr(module, "weight_orig") or hasattr(module, "parametrizations"):
        raise ValueError(
            f"{name} carries a pruning mask or parametrization; make the pruning permanent "
            "(`make_pruning_permanent_`) before structured surgery."
        )


def linear_out_in_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features); GPT-2's `Conv1D` stores it transposed."""
    return module.weight.t() if is_conv1d(module) else module.weight


@torch.no_grad()
def slice_linear(module: nn.Module, index: torch.Tensor, dim: str) -> nn.Module:
    """A new Linear/Conv1D keeping only the output features (`dim="out"`) or input features (`dim="in"`) in `index`.

    Bias entries follow the output features; dtype, device and `requires_grad` are preserved.
    """
    if dim not in ("out", "in"):
        raise ValueError(f"dim must be 'out' or 'in', got {dim!r}")
    weight = linear_out_in_weight(module)
    index = index.to(weight.device)
    new_weight = weight.index_select(0 if dim == "out" else 1, index)
    bias = module.bias
    new_bias = bias.index_select(0, index) if (bias is not None and dim == "out") else bias
    out_features, in_features = new_weight.shape
    factory = {"device": weight.device, "dtype": weight.dtype}
    if is_conv1d(module):
        new = Conv1D(out_features, in_features).to(**factory)
        new.weight.copy_(new_weight.t())
    else:
        new = nn.Linear(in_features, out_features, bias=bias is not None, **factory)
        new.weight.copy_(new_weight)
    if bias is not None:
        new.bias.copy_(new_bias)
        new.bias.requires_grad_(bias.requires_grad)
    new.weight.requires_grad_(module.weight.requires_grad)
    new.train(module.training)
    return new


def _replace(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, attr, new)


def ffn_neuron_importance(
    block: nn.Module, layout: BlockLayout, norm: str = "l2", activation_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """One score per intermediate neuron of `block`; the lowest are removed.

    Magnitude (default): the product of the norms of the neuron's weights in every projection it takes part in:
    `||[W_in[j], b_in[j]]||` for each input projection (gate and up for Llama) times `||W_out[:, j]||`. A neuron
    whose output column, or one of whose input rows, is zero scores 0 (its contribution is bounded by the product).
    With `activation_norms` (the L2 norm over calibration tokens of the neuron's activation, i.e. the input of the
    output projection), the score is `activation_norms[j] * ||W_out[:, j]||` (Wanda-style, Sun et al. 2023).
    """
    p = {"l1": 1, "l2": 2}[norm]
    out_weight = linear_out_in_weight(block.get_submodule(layout.ffn_out)).float()
    score = out_weight.norm(p=p, dim=0)
    if activation_norms is not None:
        return activation_norms.to(score.device).float() * score
    for name in layout.ffn_in:
        module = block.get_submodule(name)
        rows = linear_out_in_weight(module).float()
        if module.bias is not None:
            rows = torch.cat([rows, module.bias.float().unsqueeze(1)], dim=1)
        score = score * rows.norm(p=p, dim=1)
    return score


@torch.no_grad()
def prune_ffn_neurons_(block: nn.Module, layout: BlockLayout, keep: torch.Tensor) -> None:
    """Keep only the intermediate neurons in `keep` (sorted indices) of `block`, in place."""
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    for name in (*layout.ffn_in, layout.ffn_out):
        _check_sliceable(block.get_submodule(name), name)
    for name in layout.ffn_in:
        _replace(block, name, slice_linear(block.get_submodule(name), keep, "out"))
    _replace(block, layout.ffn_out, slice_linear(block.get_submodule(layout.ffn_out), keep, "in"))
    mlp = block.get_submodule(layout.ffn_out.rpartition(".")[0] or "")
    if hasattr(mlp, "intermediate_size"):  # LlamaMLP keeps the width as an attribute
        mlp.intermediate_size = int(keep.numel())


@torch.no_grad()
def keep_strongest_ffn_neurons_(
    block: nn.Module,
    layout: BlockLayout,
    intermediate_size: int,
    norm: str = "l2",
    activation_norms: torch.Tensor | None = None,
) -> None:
    """Keep the `intermediate_size` FFN neurons of `block` that [`ffn_neuron_importance`] scores highest, in place
    (ties keep the lower index)."""
    scores = ffn_neuron_importance(block, layout, norm=norm, activation_norms=activation_norms)
    prune_ffn_neurons_(block, layout, torch.argsort(scores, descending=True, stable=True)[:intermediate_size])


def query_head_importance(
    block: nn.Module,
    layout: BlockLayout,
    head_dim: int,
    norm: str = "l2",
    activation_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """One score per query head: `||W_q rows of the head||` times `||W_o columns of the head||` (magnitude), or
    the L2 norm of the head's attention output over calibration tokens times `||W_o columns||` when
    `activation_norms` (one value per input column of the output projection) is given."""
    p = {"l1": 1, "l2": 2}[norm]
    o_weight = linear_out_in_weight(block.get_submodule(layout.attn_output)).float()
    num_heads = o_weight.shape[1] // head_dim
    o_score = o_weight.reshape(o_weight.shape[0], num_heads, head_dim).norm(p=p, dim=(0, 2))
    if activation_norms is not None:
        act = activation_norms.to(o_score.device).float().reshape(num_heads, head_dim).norm(p=2, dim=1)
        return act * o_score
    q_module = block.get_submodule(layout.query)
    q_weight = linear_out_in_weight(q_module).float()
    if q_module.bias is not None:
        q_weight = torch.cat([q_weight, q_module.bias.float().unsqueeze(1)], dim=1)
    q_score = q_weight.reshape(num_heads, head_dim, -1).norm(p=p, dim=(1, 2))
    return q_score * o_score


def select_heads_per_group(
    num_heads: int, num_key_value_heads: int, keep_per_group: int, scores: torch.Tensor | None = None
) -> torch.Tensor:
    """Sorted indices of the query heads to keep: `keep_per_group` in each key/value group (grouped-query attention
    maps query head h to KV head `h // (num_heads // num_key_value_heads)`), the first ones or the best scored."""
    group_size = num_heads // num_key_value_heads
    keep = []
    for group in range(num_key_value_heads):
        heads = torch.arange(group * group_size, (group + 1) * group_size)
        if scores is not None:
            order = torch.argsort(scores[heads].cpu(), descending=True, stable=True)
            heads = heads[order]
        keep.append(heads[:keep_per_group])
    return torch.cat(keep).sort().values


@torch.no_grad()
def prune_query_heads_(
    block: nn.Module, layout: BlockLayout, keep_heads: torch.Tensor, head_dim: int, num_key_value_heads: int
) -> None:
    """Keep only the query heads in `keep_heads` (sorted, the same count in every KV group) of `block`, in place.

    Only for layouts with an explicit `head_dim` (Llama family): the query rows and output-projection columns of
    the removed heads go away, the key/value heads stay.
    """
    if not layout.explicit_head_dim:
        raise ValueError(f"query heads cannot be removed from a {layout.family} block without changing head_dim")
    for name in (layout.query, layout.attn_output):
        _check_sliceable(block.get_submodule(name), name)
    keep_heads = torch.as_tensor(keep_heads, dtype=torch.long)
    columns = (keep_heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
    _replace(block, layout.query, slice_linear(block.get_submodule(layout.query), columns, "out"))
    _replace(block, layout.attn_output, slice_linear(block.get_submodule(layout.attn_output), columns, "in"))
    attn = block.get_submodule(layout.query.rpartition(".")[0])
    num_heads = int(keep_heads.numel())
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = num_heads // num_key_value_heads
    for attr in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, num_heads)


def renumber_layers_(layers: Sequence[nn.Module]) -> None:
    """Set `layer_idx` (the KV-cache slot) of every sub-module of block `i` to `i`, after layers were removed.

    GPT-2 with `scale_attn_by_inverse_layer_idx` recomputes its attention scaling from the new index, as a freshly
    loaded model would.
    """
    for new_idx, block in enumerate(layers):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
                if getattr(module, "scale_attn_by_inverse_layer_idx", False) and hasattr(module, "scaling"):
                    scaling = module.head_dim**-0.5 if getattr(module, "scale_attn_weights", True) else 1.0
                    module.scaling = scaling / float(new_idx + 1)


PER_LAYER_CONFIG_LISTS = ("layer_types", "mlp_layer_types")


def subset_per_layer_config_(config, keep: Sequence[int], num_layers_before: int) -> None:
    """Update `num_hidden_layers` and the per-layer lists (`layer_types`, ...) of `config` to the kept layers."""
    for key in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == num_layers_before:
            setattr(config, key, [values[i] for i in keep])
    config.num_hidden_layers = len(keep)


def validate_config_change(config, argument: str, **changes: Any) -> None:
    """Raise a `ValueError` naming `argument` if the model's own config class rejects `changes` (e.g. Llama requires
    `hidden_size % num_attention_heads == 0` even with an explicit `head_dim`), so it fails before any surgery."""
    candidate = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(candidate, key, value)
    validate = getattr(candidate, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except Exception as e:  # the strict-dataclass error wraps the model's ValueError
        cause = e.__cause__ or e
        raise ValueError(f"{argument}: {type(config).__name__} rejects {changes}: {cause}") from e
