"""Small exports: int4 packed two per byte on disk, int8 embedding, bf16 storage of what stays unquantized."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from hf_compress import quantize_model  # noqa: E402
from hf_compress.reporting import disk_bytes  # noqa: E402
from hf_compress.utils.modules import count_parameters  # noqa: E402
from hf_compress.utils.packed_int4 import pack_int4, unpack_int4  # noqa: E402

IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))


def _model(tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_pack_unpack_round_trip():
    values = torch.randint(-8, 8, (5, 6, 10), dtype=torch.int8)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6, 5)
    assert torch.equal(unpack_int4(packed), values)
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, dtype=torch.int8))


@pytest.mark.parametrize("tie", [True, False])
def test_int4_packed_bytes_reload_and_equal_outputs(tmp_path, tie):
    model = _model(tie)
    packed = quantize_model(model, "int4-packed", output_dir=tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # stock from_pretrained (plugin registered)
    torch.testing.assert_close(_logits(reloaded), _logits(packed), rtol=0, atol=0)
    # Bytes: 4 bits per block weight + a bf16 scale per 32, int8 embedding + a bf16 scale per row, bf16 rest.
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)
    )
    emb = model.model.embed_tokens.weight
    rest = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    expected = linear // 2 + linear // 32 * 2 + emb.numel() + emb.shape[0] * 2 + rest * 2
    if not tie:
        expected += model.lm_head.weight.numel() * 2
    size = disk_bytes(tmp_path)
    assert expected < size < expected + 16_000  # + the safetensors JSON header
    fp32 = disk_bytes(model)
    assert size < fp32 / (5 if tie else 4)
    assert count_parameters(reloaded)[0] == count_parameters(model)[0]


def test_int4_packed_equals_torchao_int4_in_memory(tmp_path):
    model = _model()
    packed = quantize_model(model, "int4-packed", embedding_bits=None, storage_dtype="float32", output_dir=tmp_path)
    torchao_int4 = quantize_model(model, "torchao-int4", group_size=32)
    torch.testing.assert_close(_logits(packed), _logits(torchao_int4), rtol=0, atol=0)
    # ... at about half of its bytes on disk for the rest (both keep the same float32 embedding)
    embedding = model.model.embed_tokens.weight.numel() * 4
    assert disk_bytes(tmp_path) - embedding < 0.6 * (disk_bytes(torchao_int4) - embedding)
    with pytest.raises(ValueError, match="embedding_bits"):
        quantize_model(model, "int4-packed", embedding_bits=4)


def test_nf4_with_bf16_storage_is_smaller_and_reloads(tmp_path):
    pytest.importorskip("bitsandbytes")
    model = _model()
    default = quantize_model(model, "nf4", output_dir=tmp_path / "fp32")
    small = quantize_model(model, "nf4", storage_dtype="bfloat16", output_dir=tmp_path / "bf16")
    assert small.model.embed_tokens.weight.dtype == torch.bfloat16
    assert disk_bytes(tmp_path / "bf16") < 0.75 * disk_bytes(tmp_path / "fp32")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", device_map="cpu")
    torch.testing.assert_close(_logits(reloaded), _logits(small), rtol=0, atol=0)
    assert default.model.embed_tokens.weight.dtype == torch.float32
