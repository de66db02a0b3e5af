"""hf_compress.utils.sharding in one process: plain tensors pass through, whole CPU copies of (PEFT) models.

The sharded cases (FSDP2 DTensors, ZeRO-3 partitions) run in tests/test_accelerate_example.py on 2 CPU processes.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama

from hf_compress.utils.sharding import (
    count_nonzero,
    full_tensor,
    gather_full_state_dict,
    is_sharded,
    logical_numel,
    mul_,
    shard_like,
    single_process_loading,
    unshard_like,
    unsharded_class,
    unsharded_cpu_copy,
)


def test_plain_tensors_pass_through():
    weight = torch.nn.Parameter(torch.randn(4, 8))
    mask = torch.rand(4, 8) > 0.5
    assert full_tensor(weight) is weight
    assert shard_like(mask, weight) is mask or torch.equal(shard_like(mask, weight), mask)
    assert torch.equal(unshard_like(mask, weight), mask)
    assert count_nonzero(mask, weight) == int(mask.sum())
    assert logical_numel(weight) == 32
    expected = weight.detach() * mask
    mul_(weight, mask)
    assert torch.equal(weight.detach(), expected)


def test_unsharded_cpu_copy_of_a_plain_model_keeps_values_dtype_and_buffers():
    model = tiny_llama(hidden=64, seed=3).to(torch.bfloat16)
    assert not is_sharded(model)
    copy = unsharded_cpu_copy(model)
    assert copy is not model and type(copy) is type(model) and unsharded_class(model) is type(model)
    assert copy.dtype == torch.bfloat16
    state = gather_full_state_dict(model)
    for name, value in copy.state_dict().items():
        assert torch.equal(value, state[name]), name
        assert value.data_ptr() != model.state_dict()[name].data_ptr()  # a copy, not the live tensors
    ids = torch.arange(10).view(1, 10) + 1
    with torch.no_grad():
        assert torch.equal(copy(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_unsharded_cpu_copy_of_a_lora_model_merges_like_the_live_one():
    peft = pytest.importorskip("peft")
    model = tiny_llama(hidden=64, seed=4)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # non-zero adapters, so merging changes the weights
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    copy = unsharded_cpu_copy(lora)
    assert isinstance(copy, peft.PeftModel)
    ids = torch.arange(10).view(1, 10) + 1
    with torch.no_grad():
        live = lora.eval()(input_ids=ids).logits
        assert torch.allclose(copy(input_ids=ids).logits, live, atol=1e-6)
        merged = copy.merge_and_unload()
        assert type(merged).__name__ == "LlamaForCausalLM"
        assert torch.allclose(merged(input_ids=ids).logits, live, atol=1e-5)
    # the live model still has its adapter
    assert any("lora_A" in name for name, _ in lora.named_parameters())


def test_single_process_loading_restores_the_deepspeed_config():
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    marker = object()
    hf_deepspeed._hf_deepspeed_config_weak_ref = marker
    try:
        with single_process_loading():
            assert hf_deepspeed._hf_deepspeed_config_weak_ref is None
        assert hf_deepspeed._hf_deepspeed_config_weak_ref is marker
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
