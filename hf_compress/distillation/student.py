"""Create a smaller student of a teacher's architecture, initialised from the teacher's weights (DistilBERT style).

Sanh et al. 2019 (DistilBERT) initialise the student from every other layer of the teacher; this module does that for
BERT/RoBERTa, DistilBERT, GPT-2 and Llama-family models, and can also narrow the FFN and (Llama family) drop query
heads. The student is a fresh instance of the teacher's class built from a shrunk copy of its config, so it saves
and loads with stock `from_pretrained`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from ..utils.modules import count_parameters, unwrap_model
from ..utils.surgery import (
    evenly_spaced_indices,
    get_head_dim,
    get_intermediate_size,
    get_model_structure,
    get_num_key_value_heads,
    keep_strongest_ffn_neurons_,
    prune_query_heads_,
    query_head_importance,
    select_heads_per_group,
    subset_per_layer_config_,
    validate_config_change,
)

logger = logging.get_logger(__name__)

_HEAD_SELECTION = ("first", "magnitude")


def _load_teacher(path: str | os.PathLike, init_kwargs: dict[str, Any] | None) -> PreTrainedModel:
    """Load a model with the task class named in its config's `architectures` (falling back to `AutoModel`)."""
    import transformers

    from ..utils.loading import is_gguf, load_pretrained

    init_kwargs = dict(init_kwargs or {})
    if is_gguf(path, init_kwargs.get("gguf_file")):  # dequantized, see utils/loading.py
        return load_pretrained(path, **init_kwargs)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except OSError as e:
        raise ValueError(f"teacher={str(path)!r} is neither a model directory nor a reachable hub model: {e}") from e
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        logger.warning(f"{path}: config names no known architecture ({architectures}); loading with AutoModel")
        model_class = transformers.AutoModel
    return model_class.from_pretrained(path, **init_kwargs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _resolve_layer_indices(num_teacher_layers: int, num_layers: int | None, layer_indices: Sequence[int] | None):
    if num_layers is not None and (not _is_int(num_layers) or not 1 <= num_layers <= num_teacher_layers):
        raise ValueError(
            f"num_layers must be an integer in [1, {num_teacher_layers}] (the teacher's layers), got {num_layers!r}"
        )
    if layer_indices is None:
        return evenly_spaced_indices(num_teacher_layers, num_layers if num_layers is not None else num_teacher_layers)
    if isinstance(layer_indices, (str, bytes)) or not isinstance(layer_indices, Sequence):
        raise ValueError(f"layer_indices must be a list of teacher layer indices, got {layer_indices!r}")
    indices = list(layer_indices)
    if not indices:
        raise ValueError("layer_indices must name at least one teacher layer, got []")
    bad = [i for i in indices if not _is_int(i) or not 0 <= i < num_teacher_layers]
    if bad:
        raise ValueError(f"layer_indices {bad} are out of range: the teacher has layers 0..{num_teacher_layers - 1}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"layer_indices must be unique, got {indices}")
    if num_layers is not None and num_layers != len(indices):
        raise ValueError(f"num_layers={num_layers} disagrees with len(layer_indices)={len(indices)}")
    return indices


def _plan_heads(teacher, config, structure, indices: list[int], num_heads: int | None, head_selection: str):
    """Set the student config's heads; returns the query heads each student layer keeps (`None`: all) and head_dim."""
    layout = structure.layout
    teacher_config = teacher.config
    teacher_heads = teacher_config.num_attention_heads
    head_dim = get_head_dim(teacher_config)
    keep_heads_per_layer: list[torch.Tensor | None] = [None] * len(indices)
    if num_heads is not None and num_heads != teacher_heads:
        if not _is_int(num_heads) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
        if layout.explicit_head_dim:
            num_kv = get_num_key_value_heads(teacher_config)
            if num_heads > teacher_heads or num_heads % num_kv != 0:
                raise ValueError(
                    f"num_heads={num_heads}: a {type(teacher).__name__} student keeps a subset of the teacher's "
                    f"{teacher_heads} query heads, the same number in each of the {num_kv} key/value groups, so it "
                    f"must be a multiple of num_key_value_heads={num_kv} and <= {teacher_heads}"
                )
            validate_config_change(config, "num_heads", num_attention_heads=num_heads, head_dim=head_dim)
            config.head_dim = head_dim
            for i, src in enumerate(indices):
                scores = None
                if head_selection == "magnitude":
                    scores = query_head_importance(structure.layers[src], layout, head_dim)
                keep_heads_per_layer[i] = select_heads_per_group(teacher_heads, num_kv, num_heads // num_kv, scores)
        else:
            if config.hidden_size % num_heads != 0:
                raise ValueError(
                    f"num_heads={num_heads} must divide hidden_size={config.hidden_size}: {type(teacher).__name__} "
                    "computes head_dim = hidden_size / num_heads"
                )
            logger.warning(
                f"num_heads={num_heads} (teacher: {teacher_heads}): {type(teacher).__name__} has no per-head config "
                f"in transformers 5, so the student keeps the teacher's projection shapes and weights and only "
                f"re-partitions the {config.hidden_size} attention features into {num_heads} heads of "
                f"{config.hidden_size // num_heads} (no parameters are removed; attention patterns change)."
            )
        config.num_attention_heads = num_heads
    return keep_heads_per_layer, head_dim


@torch.no_grad()
def _copy_teacher_weights_(student, teacher, structure, indices, keep_heads_per_layer, head_dim, intermediate_size):
    """Copy the teacher's weights into the student: outside the blocks by name, block `i` from teacher block
    `indices[i]`, sliced to the student's heads and FFN width."""
    layout, config = structure.layout, student.config
    teacher_intermediate = get_intermediate_size(teacher.config, layout)
    # Everything outside the transformer blocks (embeddings, final norm, pooler, heads) is copied by name.
    prefix = structure.layers_name + "."
    outer = {k: v for k, v in teacher.state_dict().items() if not k.startswith(prefix)}
    missing, unexpected = student.load_state_dict(outer, strict=False)
    not_copied = [k for k in missing if not k.startswith(prefix)]
    if not_copied or unexpected:
        raise RuntimeError(f"student/teacher weights do not line up: missing {not_copied}, unexpected {unexpected}")

    student_layers = get_model_structure(student).layers
    for i, src in enumerate(indices):
        block = copy.deepcopy(structure.layers[src])  # the teacher stays untouched
        if keep_heads_per_layer[i] is not None:
            prune_query_heads_(block, layout, keep_heads_per_layer[i], head_dim, get_num_key_value_heads(config))
        if intermediate_size is not None and intermediate_size != teacher_intermediate:
            keep_strongest_ffn_neurons_(block, layout, intermediate_size)
        student_layers[i].load_state_dict(block.state_dict(), strict=True)
        del block


# Longer than 80 lines because of its docstring (a public API: every argument documented); the code is 53 lines.
@torch.no_grad()
def create_student(
    teacher: PreTrainedModel | str | os.PathLike,
    num_layers: int | None = None,
    num_heads: int | None = None,
    layer_indices: Sequence[int] | None = None,
    intermediate_size: int | None = None,
    *,
    head_selection: str = "first",
    teacher_model_init_kwargs: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """A smaller model of the teacher's class, initialised from the teacher's weights.

    Embeddings, final norms, pooler and heads (classifier / `lm_head`) are copied; student layer `i` is a copy of
    teacher layer `layer_indices[i]`. The teacher is not modified.

    Args:
        teacher (`PreTrainedModel` or `str`):
            The teacher, or a directory / hub name, loaded with the task class named in its config's `architectures`.
        num_layers (`int`, *optional*):
            Student depth, in [1, teacher layers]. Without `layer_indices` the teacher layers
            `[(i * L) // num_layers for i in range(num_layers)]` are taken: for 12 -> 6 that is 0, 2, 4, 6, 8, 10
            (DistilBERT's every other layer), for 12 -> 4 0, 3, 6, 9. Defaults to the teacher's depth.
        num_heads (`int`, *optional*):
            Attention heads per layer. Two different meanings, dictated by how transformers 5 builds attention:

            - BERT / DistilBERT / RoBERTa / GPT-2 compute `head_dim = hidden_size / num_heads` and have no
              `pruned_heads`: the projections keep their shapes and their weights are copied as they are; the same
              `hidden_size` features are only re-partitioned into `num_heads` heads (the reference pipeline's
              DistilBERT student with 8 of 12 heads has the same parameter count). `num_heads` must divide
              `hidden_size`. A warning is logged, since the teacher's attention patterns are not preserved.
            - Llama family (explicit `head_dim`): query heads are removed; `num_heads` must be a multiple of
              `num_key_value_heads` (each KV group keeps `num_heads / num_key_value_heads` heads) and accepted by the
              config class (Llama also wants it to divide `hidden_size`). The parameter count shrinks.
        layer_indices (`list[int]`, *optional*): the teacher layers to copy, in the student's order (unique).
        intermediate_size (`int`, *optional*):
            FFN width, in [1, teacher's]; the neurons with the largest weight norms (product of the norms of the
            rows/columns they read and write) are kept.
        head_selection (`str`, *optional*, defaults to `"first"`):
            Llama family: which query heads of each KV group are kept, `"first"` or `"magnitude"` (largest
            `||W_q head|| * ||W_o head||`).
        teacher_model_init_kwargs (`dict`, *optional*): keyword arguments of `from_pretrained` when `teacher` is a path.

    Returns:
        The student, in the teacher's dtype and device, in the teacher's train/eval mode.

    Example:

    >>> from hf_compress import create_student
    >>> student = create_student(teacher, num_layers=6)  # doctest: +SKIP
    >>> student.save_pretrained("student")  # doctest: +SKIP
    """
    if isinstance(teacher, (str, os.PathLike)):
        teacher = _load_teacher(teacher, teacher_model_init_kwargs)
    teacher = unwrap_model(teacher)
    if not isinstance(teacher, PreTrainedModel):
        raise ValueError(f"teacher must be a transformers PreTrainedModel or a path, got {type(teacher).__name__}")
    if head_selection not in _HEAD_SELECTION:
        raise ValueError(f"head_selection must be one of {_HEAD_SELECTION}, got {head_selection!r}")

    structure = get_model_structure(teacher)
    layout = structure.layout
    teacher_config = teacher.config
    num_teacher_layers = len(structure.layers)
    indices = _resolve_layer_indices(num_teacher_layers, num_layers, layer_indices)

    config = copy.deepcopy(teacher_config)
    subset_per_layer_config_(config, indices, num_teacher_layers)

    keep_heads_per_layer, head_dim = _plan_heads(teacher, config, structure, indices, num_heads, head_selection)

    teacher_intermediate = get_intermediate_size(teacher_config, layout)
    if intermediate_size is not None:
        if not _is_int(intermediate_size) or not 1 <= intermediate_size <= teacher_intermediate:
            raise ValueError(
                f"intermediate_size must be an integer in [1, {teacher_intermediate}] (the teacher's), "
                f"got {intermediate_size!r}"
            )
        setattr(config, layout.intermediate_config_key, intermediate_size)

    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and indices != list(range(len(indices))):
        logger.warning(
            "scale_attn_by_inverse_layer_idx=True: attention in student layer i is scaled by 1/(i+1), not by the "
            "1/(layer+1) of the teacher layer it was copied from (the config cannot express per-layer scales)."
        )
    first_param = next(teacher.parameters())
    student = type(teacher)._from_config(config, dtype=first_param.dtype).to(first_param.device)
    _copy_teacher_weights_(student, teacher, structure, indices, keep_heads_per_layer, head_dim, intermediate_size)

    student.train(teacher.training)
    teacher_params, student_params = count_parameters(teacher)[0], count_parameters(student)[0]
    logger.info(
        f"student of {type(teacher).__name__}: {len(indices)} layers from teacher layers {indices}, "
        f"{student_params:,} parameters (teacher {teacher_params:,}, {student_params / teacher_params:.1%})"
    )
    return student


__all__ = ["create_student"]
