"""Serving-speed paths (issue 13): the CUDA-graph runner and its eager fallbacks, static-cache greedy decoding, the
2:4 per-layer policy and its refusals, and the CUDA-only int4 export's refusals. CPU tests use the runner's
`backend="emulate"` (each replay re-runs the function on the static buffers); the kernels themselves are tested
in the `gpu`-marked tests, skipped here."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, tiny_llama
from torch import nn
from transformers.testing_utils import CaptureLogger

from hf_compress import (
    CUDAGraphRunner,
    PruningConfig,
    SparseInferenceConfig,
    StaticCacheDecoder,
    accelerate_sparse_inference_,
    capture_cuda_graphs_,
    compression_report,
    decode_tokens_per_second,
    plan_sparse_inference,
    prune_,
    quantize_int4_for_decoding_,
    quantize_model,
)
from hf_compress import inference as inference_module
from hf_compress.pruning import semi_structured

CUDA = torch.cuda.is_available()


def _ids(batch=1, seq=7, seed=0):
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _pruned_llama(hidden=128, dtype=torch.float16, exclude=None):
    model = tiny_llama(hidden=hidden, heads=4, kv_heads=2).eval()  # q/o 128x128, k/v 64x128, MLP 256x128/128x256
    prune_(model, PruningConfig(pattern="2:4", exclude_modules=exclude))
    return model.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# CUDAGraphRunner


def test_runner_replays_new_values_and_captures_per_shape():
    linear = nn.Linear(8, 4)
    runner = CUDAGraphRunner(linear, backend="emulate")
    with torch.inference_mode():
        a = runner(torch.randn(3, 8))
        x = torch.randn(3, 8)
        b = runner(x)  # same signature: replay on new values
        torch.testing.assert_close(b, linear(x))
        y = torch.randn(5, 8)
        torch.testing.assert_close(runner(y), linear(y))  # new shape: second graph
    assert runner.stats["captures"] == 2 and runner.stats["replays"] == 3 and runner.stats["eager"] == 0
    assert not torch.equal(a, b)


def test_runner_outputs_are_copies_unless_asked_otherwise():
    linear = nn.Linear(8, 4)
    with torch.inference_mode():
        runner = CUDAGraphRunner(linear, backend="emulate")
        first = runner(torch.zeros(2, 8))
        kept = first.clone()
        runner(torch.ones(2, 8))
        torch.testing.assert_close(first, kept)  # the next replay did not overwrite a returned tensor
        shared = CUDAGraphRunner(linear, backend="emulate", clone_outputs=False)
        out1 = shared(torch.zeros(2, 8))
        out2 = shared(torch.ones(2, 8))
        assert out1 is out2  # the static output, overwritten by each call
        torch.testing.assert_close(out1, linear(torch.ones(2, 8)))


def test_runner_cuda_backend_runs_cpu_tensors_eagerly():
    linear = nn.Linear(8, 4)
    runner = CUDAGraphRunner(linear)
    x = torch.randn(2, 8)
    with torch.inference_mode():
        torch.testing.assert_close(runner(x), linear(x))
    assert runner.stats == {"captures": 0, "replays": 0, "eager": 1, "failures": 0}


def test_runner_falls_back_to_eager_with_a_warning():
    linear = nn.Linear(8, 4)
    runner = CUDAGraphRunner(linear, backend="emulate", max_graphs=1)
    logger = inference_module.logger
    with CaptureLogger(logger) as captured:
        out = runner(torch.randn(2, 8))  # gradients enabled
    assert out.requires_grad and runner.stats["eager"] == 1 and "gradients are enabled" in captured.out
    with torch.inference_mode(), CaptureLogger(logger) as captured:
        runner(torch.randn(2, 8))
        runner(torch.randn(3, 8))  # a second signature with max_graphs=1
    assert runner.stats["captures"] == 1 and runner.stats["eager"] == 2
    assert "max_graphs" in captured.out


def test_runner_objects_and_containers_run_eagerly_by_default():
    calls = []

    def fn(x, state):
        calls.append(1)
        return x + 1

    runner = CUDAGraphRunner(fn, backend="emulate")
    with torch.inference_mode():
        runner(torch.zeros(2), state=object())
        runner(torch.zeros(2), state=[torch.zeros(1)])
    assert runner.stats["eager"] == 2 and len(calls) == 2
    keyed = CUDAGraphRunner(fn, backend="emulate", allow_objects=True)
    state = object()
    with torch.inference_mode():
        keyed(torch.zeros(2), state=state)
        keyed(torch.ones(2), state=state)
        torch.testing.assert_close(keyed(torch.ones(2), state=object()), torch.full((2,), 2.0))  # new identity
    assert keyed.stats["captures"] == 2 and keyed.stats["replays"] == 3


def test_runner_capture_failure_is_remembered_and_eager():
    class Failing(inference_module._EmulatedBackend):
        attempts = 0

        def capture(self, fn, warmup, builds_positions):
            Failing.attempts += 1
            raise RuntimeError("operation not permitted when stream is capturing")

    linear = nn.Linear(8, 4)
    runner = CUDAGraphRunner(linear, backend="emulate")
    runner.backend = Failing()
    x = torch.randn(2, 8)
    with torch.inference_mode(), CaptureLogger(inference_module.logger) as captured:
        torch.testing.assert_close(runner(x), linear(x))
        runner(x)
    assert Failing.attempts == 1 and runner.stats["failures"] == 1 and runner.stats["eager"] == 2
    assert "capture failed" in captured.out and "stream is capturing" in next(iter(runner.failed.values()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_graphs": 0}, "max_graphs"), ({"warmup": -1}, "warmup"), ({"backend": "tpu"}, "backend")],
)
def test_runner_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CUDAGraphRunner(nn.Linear(2, 2), **kwargs)
    with pytest.raises(TypeError, match="callable"):
        CUDAGraphRunner(3)


def test_capture_cuda_graphs_routes_the_model_and_keeps_logits():
    model = tiny_llama().eval()
    ids = _ids(2, 9)
    with torch.inference_mode():
        expected = model(input_ids=ids, use_cache=False).logits
        runner = capture_cuda_graphs_(model, backend="emulate")
        assert capture_cuda_graphs_(model) is runner  # idempotent
        first = model(input_ids=ids, use_cache=False).logits
        second = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert runner.stats["captures"] == 1 and runner.stats["replays"] == 2


@pytest.mark.parametrize("builds_positions", [True, False])
def test_capture_patch_keeps_flash_attention_only_for_model_built_positions(builds_positions):
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    with inference_module._capture_patches(builds_positions):
        inside = masking_utils.find_packed_sequence_indices
        packed = torch.tensor([[0, 1, 2, 0, 1]])  # two packed sequences: only the real check sees them
        assert (inside(packed) is None) == builds_positions
    assert masking_utils.find_packed_sequence_indices is original


# ----------------------------------------------------------------------------------------------------------------
# StaticCacheDecoder


@pytest.mark.parametrize(("graphs", "backend"), [(False, "cuda"), (True, "emulate"), (True, "cuda")])
def test_static_cache_decoder_matches_generate(graphs, backend):
    model = tiny_llama().eval()
    ids = _ids(1, 7)
    expected = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    decoder = StaticCacheDecoder(model, 24, cuda_graphs=graphs, backend=backend)
    first = decoder.generate(ids, 10)
    again = decoder.generate(ids, 10)  # cache reset in place; the captured graph is reused
    assert torch.equal(first, expected) and torch.equal(again, expected)
    if graphs and backend == "emulate":
        assert decoder.runner.stats["captures"] == 1 and decoder.runner.stats["replays"] == 18


def test_static_cache_decoder_unwraps_a_graphed_forward():
    model = tiny_llama().eval()
    ids = _ids(1, 5)
    expected = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    capture_cuda_graphs_(model, backend="emulate")
    decoder = StaticCacheDecoder(model, 16, backend="emulate")
    assert torch.equal(decoder.generate(ids, 4), expected)
    assert decoder.runner.stats["captures"] == 1


def test_static_cache_decoder_rejects_bad_use():
    model = tiny_llama().eval()
    with pytest.raises(TypeError, match="causal LM"):
        StaticCacheDecoder(nn.Linear(2, 2), 8)
    with pytest.raises(ValueError, match="max_cache_len"):
        StaticCacheDecoder(model, 1)
    decoder = StaticCacheDecoder(model, 10)
    with pytest.raises(RuntimeError, match="prefill"):
        decoder.decode(torch.zeros(1, 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="no room"):
        decoder.prefill(_ids(1, 10))
    decoder.prefill(_ids(1, 6))
    with pytest.raises(ValueError, match="exceed max_cache_len"):
        decoder.decode(torch.zeros(1, 1, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate(_ids(1, 3), 0)


def test_decode_tokens_per_second_is_measured():
    speed = decode_tokens_per_second(tiny_llama().eval(), prompt_length=4, new_tokens=4, repeats=1)
    assert speed > 0


def test_compression_report_shows_decode_speed():
    model = tiny_llama().eval()
    report = compression_report({"llama": model, "again": model}, decode_tokens=4)
    assert all(row.decode_tokens_per_s > 0 for row in report.rows)
    assert "decode tok/s" in report.to_markdown() and report.to_dict()["rows"][0]["decode_tokens_per_s"] > 0
    plain = compression_report({"llama": model})
    assert plain["llama"].decode_tokens_per_s is None and "decode tok/s" not in plain.to_markdown()
    with pytest.raises(ValueError, match="decode_tokens"):
        compression_report({"llama": model}, decode_tokens=-1)


# ----------------------------------------------------------------------------------------------------------------
# 2:4 inference: policy and refusals


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"policy": "measured"}, "Did you mean 'measure'"),
        ({"weight_format": "fp8"}, "weight_format"),
        ({"tokens": []}, "tokens"),
        ({"tokens": [0, 16]}, "tokens"),
        ({"min_speedup": 0}, "min_speedup"),
        ({"min_features": 0}, "min_features"),
    ],
)
def test_sparse_inference_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseInferenceConfig(**kwargs)


def test_static_policy_decisions_and_reasons():
    model = _pruned_llama()
    plan = plan_sparse_inference(model, SparseInferenceConfig(policy="static", tokens=[512, 2048], min_features=128))
    by_suffix = {d.name.rsplit(".", 1)[1]: d for d in plan.layers}
    assert by_suffix["q_proj"].sparse and by_suffix["up_proj"].sparse and by_suffix["down_proj"].sparse
    assert not by_suffix["k_proj"].sparse and "multiple of 128" in by_suffix["k_proj"].reason  # 64 x 128
    assert len(plan.sparse_modules) == 10 and len(plan.dense_modules) == 4
    assert "| 64 x 128 | 4 | no |" in plan.to_markdown()
    few = plan_sparse_inference(model, SparseInferenceConfig(policy="static", tokens=[1, 2048], min_features=128))
    assert few.sparse_modules == [] and "min_tokens" in few.layers[0].reason
    small = plan_sparse_inference(model, SparseInferenceConfig(policy="static", tokens=2048))  # min_features 1024
    assert small.sparse_modules == [] and "min_features" in small.layers[0].reason


def test_layers_the_kernels_cannot_take_stay_dense_with_a_warning():
    model = _pruned_llama(exclude="down_proj")
    model.model.layers[0].mlp.up_proj.weight.data = model.model.layers[0].mlp.up_proj.weight.data.float()
    with CaptureLogger(semi_structured.logger) as captured:
        plan = plan_sparse_inference(model, SparseInferenceConfig(policy="all"))
    reasons = {d.name: d.reason for d in plan.layers if not d.sparse}
    assert all("not 2:4 sparse" in reasons[f"model.layers.{i}.mlp.down_proj"] for i in range(2))
    assert "dtype float32" in reasons["model.layers.0.mlp.up_proj"]
    assert "kept dense" in captured.out and "not 2:4 sparse" in captured.out
    assert (
        "model.layers.1.mlp.up_proj" in plan.sparse_modules
        and "model.layers.0.self_attn.k_proj" in plan.sparse_modules
    )


def test_measured_policy_decides_per_shape_from_the_slowest_token_count(monkeypatch):
    # Timings stand in for the GPU measurement (ms at 256 / 2048 rows per weight shape (out, in)).
    timings = {
        (128, 128): ({256: 1.0, 2048: 4.0}, {256: 0.8, 2048: 3.0}),  # 1.25x, 1.33x: sparse
        (64, 128): ({256: 1.0, 2048: 4.0}, {256: 1.2, 2048: 2.0}),  # 0.83x at 256 rows: dense
        (256, 128): ({256: 1.0, 2048: 4.0}, {256: 0.97, 2048: 3.9}),  # 1.03x < min_speedup 1.05: dense
        (128, 256): ({256: 1.0, 2048: 4.0}, {256: 0.5, 2048: 2.0}),  # 2x: sparse
    }
    calls = []

    def fake_measure(weight, config):
        calls.append(tuple(weight.shape))
        return timings[tuple(weight.shape)]

    monkeypatch.setattr(semi_structured, "_require_cuda_layers", lambda modules: None)
    monkeypatch.setattr(semi_structured, "_measure_shape", fake_measure)
    plan = plan_sparse_inference(_pruned_llama(), SparseInferenceConfig(policy="measure", tokens=[256, 2048]))
    assert sorted(calls) == sorted(timings)  # each distinct shape measured once, not once per layer
    decided = {d.name.rsplit(".", 1)[1]: d for d in plan.layers if d.name.startswith("model.layers.0.")}
    assert decided["q_proj"].sparse and decided["down_proj"].sparse
    assert not decided["k_proj"].sparse and "0.83x at 256" in decided["k_proj"].reason
    assert not decided["up_proj"].sparse and "< min_speedup" in decided["up_proj"].reason
    assert decided["q_proj"].speedups == {256: pytest.approx(1.25), 2048: pytest.approx(4 / 3)}
    assert plan.to_dict()["layers"][0]["speedups"]

    def failing_measure(weight, config):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(semi_structured, "_measure_shape", failing_measure)
    failed = plan_sparse_inference(_pruned_llama(), SparseInferenceConfig(policy="measure"))
    assert failed.sparse_modules == [] and "could not measure" in failed.layers[0].reason


def test_hard_shape_constraint_and_fp8_dtype_rule():
    model = nn.ModuleList([nn.Linear(64, 48), nn.Linear(128, 64)]).half()  # 48 rows: not a multiple of 32
    prune_(model, PruningConfig(pattern="2:4"))
    plan = plan_sparse_inference(model, SparseInferenceConfig(policy="all"))
    assert plan.sparse_modules == ["1"] and "multiple of (32, 64)" in plan.layers[0].reason
    fp8 = plan_sparse_inference(model, SparseInferenceConfig(policy="all", weight_format="2:4-fp8"))
    assert fp8.sparse_modules == [] and "bfloat16" in fp8.layers[1].reason


def test_unpruned_model_and_cpu_are_refused():
    with pytest.raises(ValueError, match="prune"):
        plan_sparse_inference(tiny_llama().half(), SparseInferenceConfig(policy="all"))
    with pytest.raises(TypeError, match="SparseInferenceConfig"):
        plan_sparse_inference(tiny_llama(), {"policy": "all"})
    if not CUDA:
        with pytest.raises(RuntimeError, match="policy='static'"):
            plan_sparse_inference(_pruned_llama(), SparseInferenceConfig(policy="measure"))
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            accelerate_sparse_inference_(_pruned_llama())


@pytest.mark.skipif(CUDA, reason="the refusals are for machines without CUDA")
def test_int4_cuda_export_is_refused_without_cuda():
    with pytest.raises(RuntimeError, match="torchao-int4"):
        quantize_model(tiny_llama(hidden=64), "torchao-int4-cuda", group_size=32)
    with pytest.raises(RuntimeError, match="CUDA"):
        quantize_int4_for_decoding_(tiny_llama(hidden=64).to(torch.bfloat16))
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4_for_decoding_(tiny_llama(hidden=64), group_size=48)


# ----------------------------------------------------------------------------------------------------------------
# on a GPU: the kernels


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_inference_equals_masked_dense_on_gpu(dtype):
    model = _pruned_llama(hidden=256, dtype=dtype).cuda()
    dense = copy.deepcopy(model)
    plan = accelerate_sparse_inference_(model, SparseInferenceConfig(policy="all"))
    assert plan.sparse_modules
    ids = _ids(4, 64).cuda()
    with torch.inference_mode():
        expected = dense(input_ids=ids, use_cache=False).logits.float()
        for _ in range(2):  # capture, then replay
            got = model(input_ids=ids, use_cache=False).logits.float()
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * expected.abs().max().item())
    assert model.forward.stats["replays"] == 2


@pytest.mark.gpu
def test_int4_decoding_on_gpu_runs_in_graphs():
    model = tiny_llama(hidden=256, heads=4, kv_heads=2).to("cuda", torch.bfloat16).eval()
    names = quantize_int4_for_decoding_(model, group_size=128)
    assert names
    decoder = StaticCacheDecoder(model, 32)
    tokens = decoder.generate(_ids(1, 8).cuda(), 8)
    assert tokens.shape == (1, 16) and decoder.runner.stats["captures"] == 1


def test_flatten_leading_dims_gives_the_same_outputs_through_2d_calls():
    from hf_compress.pruning.semi_structured import _flatten_leading_dims_

    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4)
    x = torch.randn(2, 3, 8)
    expected = linear(x)
    seen = []
    _flatten_leading_dims_(linear)
    linear.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    out = linear(x)
    assert out.shape == (2, 3, 4)
    assert torch.allclose(out, expected, atol=1e-6)
    assert seen == [(6, 8)]  # what the layer (the fp8 kernel) is called with
