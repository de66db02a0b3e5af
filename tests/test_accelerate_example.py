"""examples/accelerate/distill_prune_qat.py under `accelerate launch` on 2 CPU processes (DDP with gloo).

`accelerate launch --cpu --num_processes 2` starts a single process, so the launch uses `--multi_gpu` with
`ACCELERATE_USE_CPU=1`, which gives a 2-process MULTI_CPU run. The second half reproduces, on CPU with torch's
`fully_shard` and gloo, how the pruning / QAT code meets FSDP2's DTensor weights (accelerate runs FSDP on GPUs only).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "accelerate" / "distill_prune_qat.py"


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _launch(tmp_path: Path, *extra: str, mode: str = "ddp") -> dict:
    """Run the example on 2 CPU processes: `mode` is "ddp" (MULTI_CPU), "fsdp2" (accelerate's FSDP2 path through
    tests/scripts/fsdp2_cpu.py) or "deepspeed" (ZeRO-3 on DeepSpeed's CPU accelerator)."""
    python_path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=python_path)
    env.pop("OUT", None)
    results = tmp_path / "results.json"
    script = [str(SCRIPT)]
    if mode == "deepspeed":  # DeepSpeed's CPU accelerator with gloo: ZeRO-3 runs on CPU
        env["DS_ACCELERATOR"] = "cpu"
        launch = ["--config_file", str(ROOT / "examples" / "accelerate" / "deepspeed_zero3.yaml")]
    elif mode == "fsdp2":
        env["ACCELERATE_USE_CPU"] = "1"
        launch = ["--config_file", str(ROOT / "examples" / "accelerate" / "fsdp2.yaml")]
        script = [str(ROOT / "tests" / "scripts" / "fsdp2_cpu.py"), str(SCRIPT)]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        launch = ["--multi_gpu", "--num_processes", "2"]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launch,
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        _free_port(),
        *script,
        "--tiny",
        "--output_dir",
        str(tmp_path / "out"),
        "--results_json",
        str(results),
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return json.loads(results.read_text())


requires_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install deepspeed)"
)


def _check_sharded(r: dict, distributed_type: str, teacher_type: str) -> None:
    """The combined run (distillation + gradual pruning + QAT inserted half way) under FSDP2 or ZeRO-3: every check
    of the example held, the teacher is sharded, the masks (sharded like the weights) held at every step."""
    assert r["world_size"] == 2 and r["distributed_type"] == distributed_type
    assert r["failures"] == [] and r["loss_last"] < r["loss_first"]
    for m in r["teacher_memory"]:
        assert m["teacher_type"] == teacher_type
        assert m["teacher_local_param_bytes"] < 0.6 * m["teacher_full_param_bytes"]
    assert (
        sum(m["teacher_local_param_bytes"] for m in r["teacher_memory"])
        >= r["teacher_memory"][0]["teacher_full_param_bytes"]
    )
    assert len(r["mask_checks"]) == r["global_step"] == r["max_steps"]
    for record in r["mask_checks"]:
        assert record["masks_identical"] and record["weights_identical"], record
        assert record["violations"] == [0, 0] and record["master_violations"] == [0, 0], record
    assert r["mask_checks"][-1]["sparsity"] == [pytest.approx(0.5, abs=1e-3)] * 2
    assert r["reload"]["equal"] and r["reload"]["max_abs_logit_diff"] <= 1e-4
    assert r["reload"]["target_sparsity"] == pytest.approx(0.5, abs=1e-3)
    # fake quantization inserted after sharding, removed at the end, and the quantized model reloads
    assert r["qat_inserted_at"] == r["max_steps"] // 2 and r["qat_layers"] > 0
    assert r["fake_quantized_layers_left_after_train"] == 0
    q = r["quantized_reload"]
    assert q is not None and q["finite"] and q["argmax_agreement"] > 0.5


@pytest.mark.multiprocess
@requires_deepspeed
def test_zero3_distill_prune_wanda_qat(tmp_path):
    """DeepSpeed ZeRO-3 on 2 CPU processes, every part at once: the teacher is a ZeRO-3 engine holding half its
    parameters per rank; Wanda pruning gathers each weight, keeps masks as ZeRO-3 partitions and zeroes the 16-bit
    and fp32 master partitions; QAT is inserted at step 4 on the partitioned student; the gathered checkpoint and
    the quantized model reload on one process."""
    r = _launch(tmp_path, "--method", "wanda", mode="deepspeed")
    _check_sharded(r, "DEEPSPEED", "DeepSpeedEngine")
    assert r["mask_checks"][0]["sparsity"][0] < r["mask_checks"][-1]["sparsity"][0]  # gradual schedule


@pytest.mark.multiprocess
@pytest.mark.slow
@requires_deepspeed
def test_zero3_lora_student_2_4(tmp_path):
    """ZeRO-3 with a LoRA student on a 2:4-pruned base: masks held, adapter + base reload, merged model quantized."""
    r = _launch(tmp_path, "--peft", "--pattern", "2:4", mode="deepspeed")
    _check_sharded(r, "DEEPSPEED", "DeepSpeedEngine")
    assert r["peft"] and r["reload"]["class"] == "LlamaForCausalLM" and r["reload"]["n_m_compliant"] is True


@pytest.mark.multiprocess
def test_fsdp2_distill_prune_qat(tmp_path):
    """accelerate's FSDP2 path on 2 CPU processes (tests/scripts/fsdp2_cpu.py): student and teacher sharded with
    `fsdp2_prepare_model`, masks kept as DTensors, QAT inserted after sharding, full checkpoint and quantized model
    reload."""
    r = _launch(tmp_path, mode="fsdp2")
    _check_sharded(r, "FSDP2", "FSDPLlamaForCausalLM")
    assert r["mask_checks"][0]["sparsity"][0] < r["mask_checks"][-1]["sparsity"][0]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp2_lora_student_wanda_2_4(tmp_path):
    """FSDP2 with a LoRA student on a base pruned 2:4 with Wanda (calibration forward through the sharded model)."""
    r = _launch(tmp_path, "--peft", "--pattern", "2:4", "--method", "wanda", mode="fsdp2")
    _check_sharded(r, "FSDP2", "FSDPLlamaForCausalLM")
    assert r["peft"] and r["reload"]["class"] == "LlamaForCausalLM" and r["reload"]["n_m_compliant"] is True


def _check_common(r: dict) -> None:
    assert r["world_size"] == 2
    assert r["distributed_type"] == "MULTI_CPU"
    assert r["failures"] == []
    assert r["loss_last"] < r["loss_first"]
    # one gathered check per optimizer step, masks identical on both ranks and every pruned weight still zero
    assert len(r["mask_checks"]) == r["global_step"] == r["max_steps"]
    for record in r["mask_checks"]:
        assert record["masks_identical"], record
        assert record["weights_identical"], record  # DDP kept the pruned weights in sync
        assert record["violations"] == [0, 0], record
        assert len(set(record["sparsity"])) == 1
    assert r["mask_checks"][-1]["sparsity"] == [pytest.approx(0.5, abs=1e-3)] * 2
    # DDP: each rank holds the whole teacher
    for m in r["teacher_memory"]:
        assert m["teacher_local_param_bytes"] == m["teacher_full_param_bytes"] > 0
    assert r["reload"]["equal"] and r["reload"]["max_abs_logit_diff"] <= 1e-4
    assert r["reload"]["target_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert r["qat_inserted_at"] == r["max_steps"] // 2 and r["qat_layers"] > 0


@pytest.mark.multiprocess
def test_distill_prune_qat_ddp_two_processes(tmp_path):
    r = _launch(tmp_path)
    _check_common(r)
    assert not r["peft"]
    # the gradual schedule raised the sparsity during training, identically on both ranks
    assert r["mask_checks"][0]["sparsity"][0] < r["mask_checks"][-1]["sparsity"][0]
    q = r["quantized_reload"]
    assert q is not None and q["finite"] and q["argmax_agreement"] > 0.5


@pytest.mark.multiprocess
def test_distill_prune_qat_ddp_two_processes_lora_student(tmp_path):
    r = _launch(tmp_path, "--peft")
    _check_common(r)
    assert r["peft"]
    assert r["reload"]["class"] == "LlamaForCausalLM"  # adapter + pruned base through stock from_pretrained


# ------------------------------------------------------------------------------------------------------------------
# FSDP2 on CPU. Accelerate runs FSDP only on GPUs, but torch's own `fully_shard` runs on CPU with gloo, so the ways
# the compression callbacks meet FSDP2's DTensor parameters can be reproduced here, without a GPU. Under FSDP2 the
# Trainer hands the callbacks a model whose Linear weights are DTensor shards.


def _fsdp2_worker(out_dir: str) -> None:  # runs under torchrun, 2 processes
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_llama

    from hf_compress import PruningConfig, QATConfig
    from hf_compress.pruning.callback import _broadcast_masks
    from hf_compress.pruning.unstructured import apply_masks_, compute_masks, get_pruning_targets
    from hf_compress.quantization.qat import prepare_qat_

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    qat_config = QATConfig(scheme="int8-dynamic-activation-int4-weight", group_size=32)

    def sharded(prepare_before: bool = False):
        model = tiny_llama(hidden=64, seed=0)
        if prepare_before:
            prepare_qat_(model, qat_config)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def attempt(fn):
        try:
            return {"ok": True, **(fn() or {})}
        except Exception as err:  # noqa: BLE001 - the error is the finding
            return {"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}

    def prune(pattern, broadcast=False):
        def fn():
            model = sharded()
            config = PruningConfig(pattern="2:4") if pattern == "2:4" else PruningConfig(sparsity=0.5)
            masks = compute_masks(model, config)
            if broadcast:  # as PruningCallback._prune does: rank 0's masks go to every rank
                masks = _broadcast_masks(masks)
            apply_masks_(get_pruning_targets(model, config), masks)
            weight = model.model.layers[0].self_attn.q_proj.weight.full_tensor()
            model(input_ids=ids)
            return {"zero_fraction": float((weight == 0).float().mean())}

        return fn

    def callback():  # PruningCallback's hooks as the Trainer calls them, on an FSDP2 model
        from types import SimpleNamespace

        from safetensors.torch import load_file

        from hf_compress import PruningCallback

        model = sharded()
        cb = PruningCallback(PruningConfig(sparsity=0.5))
        args = SimpleNamespace(output_dir=out_dir, resume_from_checkpoint=None)
        state = SimpleNamespace(global_step=0, is_world_process_zero=rank == 0, stateful_callbacks={})
        cb.on_train_begin(args, state, None, model=model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        cb.on_optimizer_step(args, state, None)
        state.global_step = 1
        Path(out_dir, "checkpoint-1").mkdir(exist_ok=True)
        dist.barrier()
        cb.on_save(args, state, None)
        dist.barrier()
        saved = load_file(str(Path(out_dir, "checkpoint-1", "pruning_masks.safetensors")))
        weight = model.model.layers[0].self_attn.q_proj.weight.full_tensor()
        return {
            "sparsity": cb.sparsity,
            "zero_fraction": float((weight == 0).float().mean()),
            "saved_shape": list(saved["model.layers.0.self_attn.q_proj"].shape),
            "saved_zero_fraction": float(1 - saved["model.layers.0.self_attn.q_proj"].float().mean()),
        }

    def qat(prepare_before):
        def fn():
            model = sharded(prepare_before)
            if not prepare_before:
                prepare_qat_(model, qat_config)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grad = model.model.layers[0].self_attn.q_proj.weight.grad
            return {"loss": float(loss), "grad_norm": float(grad.full_tensor().norm())}

        return fn

    def qat_convert():  # fake quantization in and out of a sharded model: the plain model's logits come back
        from hf_compress.quantization.qat import convert_qat_, fake_quantized_module_names

        model = sharded()
        with torch.no_grad():
            plain = model(input_ids=ids).logits
        prepare_qat_(model, qat_config)
        with torch.no_grad():
            fake = model(input_ids=ids).logits
        inserted = len(fake_quantized_module_names(model))
        convert_qat_(model)
        with torch.no_grad():
            back = model(input_ids=ids).logits
        return {
            "inserted": inserted,
            "left": len(fake_quantized_module_names(model)),
            "fake_changed_logits": float((fake - plain).abs().max()),
            "converted_diff": float((back - plain).abs().max()),
        }

    def prune_wanda():  # Wanda scores on DTensor weights (calibration forward through the sharded model)
        config = PruningConfig(sparsity=0.5, method="wanda", num_calibration_batches=2)
        calibration = [{"input_ids": ids}, {"input_ids": ids.flip(0)}]
        reference = compute_masks(tiny_llama(hidden=64, seed=0), config, calibration_data=calibration)
        model = sharded()
        masks = compute_masks(model, config, calibration_data=calibration)
        return {
            "equal_to_unsharded": all(torch.equal(masks[n].full_tensor(), reference[n]) for n in reference),
            "dtensor_masks": all(hasattr(m, "full_tensor") for m in masks.values()),
        }

    results = {
        "prune_unstructured": attempt(prune("unstructured")),
        "prune_2_4": attempt(prune("2:4")),
        "prune_2_4_broadcast": attempt(prune("2:4", broadcast=True)),
        "prune_callback": attempt(callback),
        "qat_after_sharding": attempt(qat(False)),
        "qat_before_sharding": attempt(qat(True)),
        "qat_convert_after_sharding": attempt(qat_convert),
        "prune_wanda": attempt(prune_wanda),
    }
    Path(out_dir, f"fsdp2_rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port()]
    proc = subprocess.run(
        [*cmd, __file__, "fsdp2", str(out)], env=env, capture_output=True, text=True, timeout=240, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"fsdp2_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    return ranks


@pytest.mark.multiprocess
def test_fsdp2_nm_pruning_on_dtensor_weights(fsdp2_results):
    for rank in fsdp2_results:
        assert rank["prune_2_4"]["ok"], rank["prune_2_4"]
        assert rank["prune_2_4"]["zero_fraction"] == pytest.approx(0.5)


@pytest.mark.multiprocess
def test_fsdp2_qat_inserted_before_sharding_trains(fsdp2_results):
    for rank in fsdp2_results:
        assert rank["qat_before_sharding"]["ok"], rank["qat_before_sharding"]
    assert fsdp2_results[0]["qat_before_sharding"]["loss"] == fsdp2_results[1]["qat_before_sharding"]["loss"]


@pytest.mark.multiprocess
def test_fsdp2_pruning_callback_mask_broadcast(fsdp2_results):
    for rank in fsdp2_results:
        assert rank["prune_2_4_broadcast"]["ok"], rank["prune_2_4_broadcast"]
        assert rank["prune_2_4_broadcast"]["zero_fraction"] == pytest.approx(0.5)


@pytest.mark.multiprocess
def test_fsdp2_unstructured_pruning_on_dtensor_weights(fsdp2_results):
    for rank in fsdp2_results:
        assert rank["prune_unstructured"]["ok"], rank["prune_unstructured"]
        assert rank["prune_unstructured"]["zero_fraction"] == pytest.approx(0.5)


@pytest.mark.multiprocess
def test_fsdp2_pruning_callback_hooks_and_full_checkpoint_masks(fsdp2_results):
    for rank in fsdp2_results:
        result = rank["prune_callback"]
        assert result["ok"], result
        assert result["sparsity"] == pytest.approx(0.5)
        assert result["zero_fraction"] == pytest.approx(0.5)  # re-masked after the optimizer step
        assert result["saved_shape"] == [64, 64]  # whole masks in the checkpoint, not a rank's shard
        assert result["saved_zero_fraction"] == pytest.approx(0.5)


@pytest.mark.multiprocess
def test_fsdp2_qat_inserted_after_sharding(fsdp2_results):
    """prepare_qat_ on a model FSDP2 already sharded (what QATCallback does at start_step): the Linear modules are
    fake-quantized in place, so FSDP2 still unshards their weights; loss and gradients equal those of fake
    quantization inserted before sharding."""
    for rank in fsdp2_results:
        after, before = rank["qat_after_sharding"], rank["qat_before_sharding"]
        assert after["ok"], after
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-6)
        assert after["grad_norm"] == pytest.approx(before["grad_norm"], rel=1e-5)


@pytest.mark.multiprocess
def test_fsdp2_qat_convert_after_sharding(fsdp2_results):
    for rank in fsdp2_results:
        result = rank["qat_convert_after_sharding"]
        assert result["ok"], result
        assert result["inserted"] == 14 and result["left"] == 0
        assert result["fake_changed_logits"] > 0  # fake quantization was active in the sharded forward
        assert result["converted_diff"] == 0.0  # and removing it gives the plain model back exactly


@pytest.mark.multiprocess
def test_fsdp2_wanda_masks_match_unsharded(fsdp2_results):
    for rank in fsdp2_results:
        result = rank["prune_wanda"]
        assert result["ok"], result
        assert result["equal_to_unsharded"] and result["dtensor_masks"]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "fsdp2":
    _fsdp2_worker(sys.argv[2])
