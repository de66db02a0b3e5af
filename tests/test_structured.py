"""structured_prune_: physical removal of FFN neurons, Llama query heads and layers, with exact-output checks."""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    random_token_batch,
    tiny_bert,
    tiny_distilbert,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
    tiny_roberta,
)

from hf_compress.pruning.structured import StructuredPruningConfig, structured_prune_
from hf_compress.utils.modules import count_parameters
from hf_compress.utils.surgery import ffn_neuron_importance, get_model_structure

BUILDERS = {
    "bert": tiny_bert,
    "distilbert": tiny_distilbert,
    "roberta": tiny_roberta,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
}
HIDDEN, INTERMEDIATE, HEAD_DIM = 32, 64, 8  # of every tiny model (GPT-2: n_inner set explicitly below)


def build(arch: str, layers: int = 4):
    kwargs = {"n_inner": INTERMEDIATE} if arch == "gpt2" else {}
    return BUILDERS[arch](layers=layers, **kwargs).eval()


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path)
    return type(model).from_pretrained(tmp_path).eval()


def out_in(module):
    """Weight as (out, in) whatever the module type (GPT-2 Conv1D is transposed)."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


@torch.no_grad()
def kill_neurons(model, neurons: torch.Tensor):
    """Zero the output-projection columns of `neurons` in every layer: they no longer contribute anything."""
    structure = get_model_structure(model)
    for block in structure.layers:
        out_in(block.get_submodule(structure.layout.ffn_out))[:, neurons] = 0


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_ffn_pruning_of_dead_neurons_keeps_outputs(arch, tmp_path):
    model = build(arch)
    dead = torch.arange(0, INTERMEDIATE, 4)  # 16 of 64 neurons
    kill_neurons(model, dead)
    structure = get_model_structure(model)
    alive = torch.tensor([j for j in range(INTERMEDIATE) if j not in set(dead.tolist())])
    kept_weights = [out_in(b.get_submodule(structure.layout.ffn_out))[:, alive].clone() for b in structure.layers]
    batch = random_token_batch(pad_last=3)
    reference = logits(model, batch)
    params_before = count_parameters(model)[0]

    returned = structured_prune_(model, StructuredPruningConfig(ffn_pruning_ratio=0.25))

    assert returned is model
    layout = structure.layout
    assert getattr(model.config, layout.intermediate_config_key) == 48
    torch.testing.assert_close(logits(model, batch), reference, rtol=1e-5, atol=1e-6)
    # Exactly the dead neurons went; the others are untouched, in order.
    for block, expected in zip(get_model_structure(model).layers, kept_weights):
        torch.testing.assert_close(out_in(block.get_submodule(layout.ffn_out)), expected, rtol=0, atol=0)
    # Hand count per layer for 16 neurons: input rows (+ bias) of each input projection + output columns.
    has_bias = arch not in ("llama", "qwen2")
    num_in = 2 if arch in ("llama", "qwen2") else 1
    removed_per_layer = num_in * 16 * (HIDDEN + int(has_bias)) + 16 * HIDDEN
    assert count_parameters(model)[0] == params_before - 4 * removed_per_layer

    loaded = roundtrip(model, tmp_path)
    assert count_parameters(loaded)[0] == count_parameters(model)[0]
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)


def test_ffn_target_size_and_l1_importance(tmp_path):
    model = build("distilbert")
    structured_prune_(model, StructuredPruningConfig(target_intermediate_size=10, importance="l1"))
    assert model.config.hidden_dim == 10
    assert model.distilbert.transformer.layer[3].ffn.lin1.out_features == 10
    assert model.distilbert.transformer.layer[3].ffn.lin2.in_features == 10
    loaded = roundtrip(model, tmp_path)
    batch = random_token_batch()
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)


def test_activation_importance_with_calibration():
    model = build("llama")
    dead = torch.arange(32, 64)
    with torch.no_grad():  # dead neurons: zero gate rows -> SiLU(0) * up = 0 activation on every token
        for block in model.model.layers:
            block.mlp.gate_proj.weight[dead] = 0
            block.mlp.down_proj.weight[:, dead] *= 100  # large output weights: only activations reveal them
    batch = random_token_batch()
    reference = logits(model, batch)
    structured_prune_(model, StructuredPruningConfig(ffn_pruning_ratio=0.5, importance="activation"), [batch])
    assert model.config.intermediate_size == 32
    torch.testing.assert_close(logits(model, batch), reference, rtol=1e-5, atol=1e-6)


def test_activation_score_formula():
    block = get_model_structure(build("bert")).layers[0]
    layout = get_model_structure(build("bert")).layout
    acts = torch.rand(INTERMEDIATE)
    expected = acts * block.output.dense.weight.norm(dim=0)
    torch.testing.assert_close(ffn_neuron_importance(block, layout, activation_norms=acts), expected)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_head_pruning_of_dead_heads_keeps_outputs(arch, tmp_path):
    model = build(arch)  # 4 query heads, 2 KV groups: {0, 1}, {2, 3}
    with torch.no_grad():
        for block in model.model.layers:  # heads 1 and 3 write nothing
            block.self_attn.o_proj.weight[:, 8:16] = 0
            block.self_attn.o_proj.weight[:, 24:32] = 0
    batch = random_token_batch(pad_last=2)
    reference = logits(model, batch)
    params_before = count_parameters(model)[0]

    structured_prune_(model, StructuredPruningConfig(num_heads_to_prune=2))

    assert model.config.num_attention_heads == 2
    assert model.config.head_dim == HEAD_DIM
    torch.testing.assert_close(logits(model, batch), reference, rtol=1e-5, atol=1e-6)
    q_bias = 1 if arch == "qwen2" else 0
    removed_per_layer = 2 * HEAD_DIM * (HIDDEN + q_bias) + 2 * HEAD_DIM * HIDDEN
    assert count_parameters(model)[0] == params_before - 4 * removed_per_layer
    assert model.model.layers[0].self_attn.num_key_value_groups == 1

    loaded = roundtrip(model, tmp_path)
    assert loaded.config.num_attention_heads == 2
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)


def test_head_pruning_activation_importance():
    model = build("llama")
    with torch.no_grad():
        for block in model.model.layers:  # heads 0 and 2 write nothing, whatever they attend to
            block.self_attn.o_proj.weight[:, 0:8] = 0
            block.self_attn.o_proj.weight[:, 16:24] = 0
    batch = random_token_batch()
    reference = logits(model, batch)
    cfg = StructuredPruningConfig(target_num_heads=2, importance="activation")
    structured_prune_(model, cfg, calibration_data=[batch])
    torch.testing.assert_close(logits(model, batch), reference, rtol=1e-5, atol=1e-6)


def test_head_pruning_rejected_for_bert_like_models():
    model = build("bert")
    params = count_parameters(model)[0]
    with pytest.raises(ValueError, match="num_heads_to_prune.*Llama-family"):
        structured_prune_(model, StructuredPruningConfig(num_heads_to_prune=2, ffn_pruning_ratio=0.5))
    assert count_parameters(model)[0] == params  # nothing changed before the error


def test_drop_given_layers_llama_kv_cache(tmp_path):
    model = build("llama")
    originals = [model.model.layers[i] for i in (0, 2, 3)]
    structured_prune_(model, StructuredPruningConfig(layers_to_drop=[1]))
    assert model.config.num_hidden_layers == 3
    assert list(model.model.layers) == originals
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]

    # Incremental decoding through the KV cache gives the same last-token logits as a full forward pass.
    ids = random_token_batch(batch=2, seq=10)["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=prefix.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)

    loaded = roundtrip(model, tmp_path)
    torch.testing.assert_close(logits(loaded, {"input_ids": ids}), logits(model, {"input_ids": ids}), rtol=0, atol=0)


def test_drop_layers_updates_layer_types(tmp_path):
    model = tiny_qwen2(layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2).eval()
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    structured_prune_(model, StructuredPruningConfig(layers_to_drop=[0]))
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    loaded = roundtrip(model, tmp_path)
    assert loaded.config.layer_types == model.config.layer_types
    batch = random_token_batch(seq=12)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2"])
def test_drop_evenly_spaced_layers(arch, tmp_path):
    model = build(arch)
    structure = get_model_structure(model)
    kept = [structure.layers[0], structure.layers[2]]
    per_layer = sum(p.numel() for p in kept[0].parameters())
    params_before = count_parameters(model)[0]
    structured_prune_(model, StructuredPruningConfig(num_layers_to_drop=2))
    assert list(get_model_structure(model).layers) == kept
    assert model.config.num_hidden_layers == 2
    assert count_parameters(model)[0] == params_before - 2 * per_layer
    loaded = roundtrip(model, tmp_path)
    batch = random_token_batch(pad_last=2)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_block_influence_drops_identity_layer(arch):
    model = build(arch)
    structure = get_model_structure(model)
    with torch.no_grad():  # layer 2 adds nothing to its input: a pure residual pass-through
        block = structure.layers[2]
        if arch == "llama":
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        else:
            for name in ("attn.c_proj", "mlp.c_proj"):
                block.get_submodule(name).weight.zero_()
                block.get_submodule(name).bias.zero_()
    batch = random_token_batch()
    reference = logits(model, batch)
    cfg = StructuredPruningConfig(num_layers_to_drop=1, layer_importance="block_influence")
    structured_prune_(model, cfg, calibration_data=[batch, batch])
    assert model.config.num_hidden_layers == 3
    assert all(b is not block for b in get_model_structure(model).layers)
    torch.testing.assert_close(logits(model, batch), reference, rtol=1e-5, atol=1e-5)


def test_combined_prune_roundtrip(tmp_path):
    model = build("llama")
    cfg = StructuredPruningConfig(num_layers_to_drop=1, target_num_heads=2, ffn_pruning_ratio=0.5)
    structured_prune_(model, cfg)
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.intermediate_size) == (
        3,
        2,
        32,
    )
    # 3 layers of: 2 norms, q/o of 2 heads, k/v of 2 KV heads, 3 FFN projections of width 32; plus embeddings/head.
    per_layer = 2 * HIDDEN + 4 * (2 * HEAD_DIM * HIDDEN) + 3 * 32 * HIDDEN
    assert count_parameters(model)[0] == 3 * per_layer + 2 * 96 * HIDDEN + HIDDEN
    loaded = roundtrip(model, tmp_path)
    batch = random_token_batch()
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"ffn_pruning_ratio": 1.0}, "ffn_pruning_ratio"),
        ({"ffn_pruning_ratio": -0.1}, "ffn_pruning_ratio"),
        ({"ffn_pruning_ratio": 0.5, "target_intermediate_size": 8}, "target_intermediate_size"),
        ({"target_intermediate_size": 0}, "target_intermediate_size"),
        ({"num_heads_to_prune": -1}, "num_heads_to_prune"),
        ({"num_heads_to_prune": 1, "target_num_heads": 2}, "target_num_heads"),
        ({"layers_to_drop": [1, 1]}, "layers_to_drop"),
        ({"layers_to_drop": [-1]}, "layers_to_drop"),
        ({"layers_to_drop": [1], "num_layers_to_drop": 1}, "num_layers_to_drop"),
        ({"importance": "l3"}, "importance.*Did you mean 'l2'"),
        ({"layer_importance": "random"}, "layer_importance"),
        ({"num_calibration_batches": 0}, "num_calibration_batches"),
    ],
)
def test_config_bounds(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        StructuredPruningConfig(**kwargs)


@pytest.mark.parametrize(
    ("arch", "kwargs", "argument"),
    [
        ("bert", {"layers_to_drop": [4]}, "layers_to_drop"),
        ("bert", {"layers_to_drop": [0, 1, 2, 3]}, "layers_to_drop"),
        ("gpt2", {"num_layers_to_drop": 4}, "num_layers_to_drop"),
        ("gpt2", {"target_intermediate_size": 65}, "target_intermediate_size"),
        ("llama", {"num_heads_to_prune": 1}, "num_heads_to_prune.*multiple of num_key_value_heads"),
        ("llama", {"target_num_heads": 6}, "target_num_heads"),
        ("llama", {"importance": "activation", "ffn_pruning_ratio": 0.5}, "calibration_data"),
        ("llama", {"num_layers_to_drop": 1, "layer_importance": "block_influence"}, "calibration_data"),
    ],
)
def test_model_dependent_errors_before_any_change(arch, kwargs, argument):
    model = build(arch)
    params = count_parameters(model)[0]
    with pytest.raises(ValueError, match=argument):
        structured_prune_(model, StructuredPruningConfig(**kwargs))
    assert count_parameters(model)[0] == params
    assert model.config.num_hidden_layers == 4


def test_llama_config_validation_is_reported():
    # Llama's config insists on hidden_size % num_attention_heads == 0 even with an explicit head_dim.
    model = tiny_llama(layers=1, hidden=48, heads=12, kv_heads=3).eval()
    with pytest.raises(ValueError, match="target_num_heads.*LlamaConfig"):
        structured_prune_(model, StructuredPruningConfig(target_num_heads=9))
    assert model.config.num_attention_heads == 12
    structured_prune_(model, StructuredPruningConfig(target_num_heads=6))
    assert model.model.layers[0].self_attn.q_proj.out_features == 6 * 4


def test_bad_calibration_data():
    model = build("llama")
    with pytest.raises(ValueError, match="calibration_data"):
        structured_prune_(
            model, StructuredPruningConfig(ffn_pruning_ratio=0.5, importance="activation"), calibration_data=[1, 2]
        )
