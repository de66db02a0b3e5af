"""create_student: shrunk configs, weights copied from the chosen teacher layers, save/load round trips."""

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

from hf_compress.distillation.student import create_student
from hf_compress.utils.modules import count_parameters
from hf_compress.utils.surgery import evenly_spaced_indices, get_model_structure

BUILDERS = {
    "bert": tiny_bert,
    "distilbert": tiny_distilbert,
    "roberta": tiny_roberta,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
}


def build(arch: str, layers: int = 4):
    return BUILDERS[arch](layers=layers).eval()


def layers_of(model):
    return get_model_structure(model).layers


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def roundtrip_logits(model, tmp_path, batch):
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        return model(**batch).logits, loaded(**batch).logits, loaded


def test_evenly_spaced_rule():
    assert evenly_spaced_indices(12, 6) == [0, 2, 4, 6, 8, 10]
    assert evenly_spaced_indices(12, 4) == [0, 3, 6, 9]
    assert evenly_spaced_indices(6, 4) == [0, 1, 3, 4]
    assert evenly_spaced_indices(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_indices(4, 1) == [0]


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_student_layers_copied_and_roundtrip(arch, tmp_path):
    teacher = build(arch)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = create_student(teacher, num_layers=2)

    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == 2
    assert len(layers_of(student)) == 2
    # Every other layer: student layer i is teacher layer 2 * i, weight for weight.
    for i, src in enumerate([0, 2]):
        assert_same_state(layers_of(student)[i], layers_of(teacher)[src])
    # Teacher layers are all the same size, so the student lost exactly two of them.
    per_layer = n_params(layers_of(teacher)[0])
    assert count_parameters(student)[0] == count_parameters(teacher)[0] - 2 * per_layer
    # Embeddings, norms and heads are copied; the teacher is untouched.
    prefix = get_model_structure(teacher).layers_name + "."
    for key, value in student.state_dict().items():
        if not key.startswith(prefix):
            torch.testing.assert_close(value, teacher.state_dict()[key], rtol=0, atol=0, msg=key)
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_state[key], rtol=0, atol=0)
    if hasattr(student.config, "layer_types") and student.config.layer_types is not None:
        assert len(student.config.layer_types) == 2

    batch = random_token_batch(pad_last=3)
    before, after, loaded = roundtrip_logits(student, tmp_path, batch)
    assert torch.isfinite(before).all()
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert loaded.config.num_hidden_layers == 2


def test_student_layer_indices_order_and_sizes():
    teacher = build("bert")
    student = create_student(teacher, layer_indices=[3, 1])
    assert student.config.num_hidden_layers == 2
    assert_same_state(layers_of(student)[0], layers_of(teacher)[3])
    assert_same_state(layers_of(student)[1], layers_of(teacher)[1])
    assert [m.attention.self.layer_idx for m in layers_of(student)] == [0, 1]


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2"])
def test_fewer_heads_repartitions_without_removing_weights(arch, tmp_path, caplog):
    teacher = build(arch)
    student = create_student(teacher, num_layers=2, num_heads=2)
    assert student.config.num_attention_heads == 2
    # Same projection shapes and weights: only the head partition changed (head_dim 8 -> 16).
    assert count_parameters(student)[0] == count_parameters(create_student(teacher, num_layers=2))[0]
    for i, src in enumerate([0, 2]):
        assert_same_state(layers_of(student)[i], layers_of(teacher)[src])
    batch = random_token_batch()
    before, after, loaded = roundtrip_logits(student, tmp_path, batch)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert loaded.config.num_attention_heads == 2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_family_fewer_heads_removes_query_heads(arch, tmp_path):
    teacher = build(arch)  # hidden 32, 4 query heads of 8, 2 KV heads: groups {0, 1} and {2, 3}
    hidden, head_dim = 32, 8
    student = create_student(teacher, num_layers=2, num_heads=2)
    assert student.config.num_attention_heads == 2
    assert student.config.num_key_value_heads == 2
    assert student.config.head_dim == head_dim
    removed = 2 * (2 * head_dim * hidden * 2)  # 2 layers x 2 heads x (q rows + o columns); no attention bias in o
    if arch == "qwen2":  # Qwen2's q_proj has a bias
        removed += 2 * 2 * head_dim
    assert count_parameters(student)[0] == count_parameters(create_student(teacher, num_layers=2))[0] - removed
    # First query head of each KV group: heads 0 and 2.
    rows = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])
    for i, src in enumerate([0, 2]):
        t_attn, s_attn = layers_of(teacher)[src].self_attn, layers_of(student)[i].self_attn
        torch.testing.assert_close(s_attn.q_proj.weight, t_attn.q_proj.weight[rows], rtol=0, atol=0)
        torch.testing.assert_close(s_attn.o_proj.weight, t_attn.o_proj.weight[:, rows], rtol=0, atol=0)
        torch.testing.assert_close(s_attn.k_proj.weight, t_attn.k_proj.weight, rtol=0, atol=0)
    batch = random_token_batch(pad_last=2)
    before, after, loaded = roundtrip_logits(student, tmp_path, batch)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert loaded.model.layers[0].self_attn.q_proj.out_features == 16


def test_llama_head_selection_by_magnitude():
    teacher = build("llama")
    with torch.no_grad():
        for block in layers_of(teacher):
            block.self_attn.q_proj.weight[0:8] *= 0.01  # head 0 weak -> head 1 kept in group 0
            block.self_attn.q_proj.weight[24:32] *= 0.01  # head 3 weak -> head 2 kept in group 1
    student = create_student(teacher, num_heads=2, head_selection="magnitude")
    rows = torch.arange(8, 24)
    torch.testing.assert_close(
        layers_of(student)[1].self_attn.q_proj.weight, layers_of(teacher)[1].self_attn.q_proj.weight[rows]
    )


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_student_intermediate_size_keeps_strongest_neurons(arch, tmp_path):
    teacher = build(arch)
    structure = get_model_structure(teacher)
    layout = structure.layout
    strong = torch.tensor([5, 17, 40, 63])
    with torch.no_grad():
        for block in structure.layers:
            out = block.get_submodule(layout.ffn_out)
            if arch == "gpt2":  # Conv1D stores (in, out): neuron j is row j of c_proj
                out.weight[strong] *= 10
            else:
                out.weight[:, strong] *= 10
    student = create_student(teacher, num_layers=2, intermediate_size=4)
    key = layout.intermediate_config_key
    assert getattr(student.config, key) == 4
    block_s, block_t = layers_of(student)[1], layers_of(teacher)[2]
    w_s = block_s.get_submodule(layout.ffn_out).weight
    w_t = block_t.get_submodule(layout.ffn_out).weight
    expected = w_t[strong] if arch == "gpt2" else w_t[:, strong]
    torch.testing.assert_close(w_s, expected, rtol=0, atol=0)
    before, after, _ = roundtrip_logits(student, tmp_path, random_token_batch())
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_teacher_given_as_path(tmp_path):
    teacher = build("distilbert")
    teacher.save_pretrained(tmp_path / "teacher")
    student = create_student(str(tmp_path / "teacher"), num_layers=1)
    assert type(student).__name__ == "DistilBertForSequenceClassification"
    assert_same_state(layers_of(student)[0], layers_of(teacher)[0])
    torch.testing.assert_close(student.classifier.weight, teacher.classifier.weight, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("arch", "kwargs", "argument"),
    [
        ("bert", {"num_layers": 0}, "num_layers"),
        ("bert", {"num_layers": 5}, "num_layers"),
        ("bert", {"num_layers": 2.0}, "num_layers"),
        ("bert", {"layer_indices": [0, 4]}, "layer_indices"),
        ("bert", {"layer_indices": [1, 1]}, "layer_indices"),
        ("bert", {"layer_indices": []}, "layer_indices"),
        ("bert", {"layer_indices": [0, 1], "num_layers": 3}, "num_layers"),
        ("bert", {"num_heads": 3}, "num_heads"),
        ("gpt2", {"num_heads": 0}, "num_heads"),
        ("llama", {"num_heads": 3}, "num_heads"),
        ("llama", {"num_heads": 6}, "num_heads"),
        ("bert", {"intermediate_size": 0}, "intermediate_size"),
        ("llama", {"intermediate_size": 65}, "intermediate_size"),
        ("bert", {"head_selection": "best"}, "head_selection"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(arch, kwargs, argument):
    teacher = build(arch)
    with pytest.raises(ValueError, match=argument):
        create_student(teacher, **kwargs)


def test_bad_teacher_path_raises(tmp_path):
    with pytest.raises(ValueError, match="teacher"):
        create_student(str(tmp_path / "does-not-exist"), num_layers=1)
