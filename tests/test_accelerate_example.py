"""examples/accelerate/distill_prune_qat.py under `accelerate launch` on 2 CPU processes (DDP with gloo).

`accelerate launch --cpu --num_processes 2` starts a single process, so the launch uses `--multi_gpu` with
`ACCELERATE_USE_CPU=1`, which gives a 2-process MULTI_CPU run.
"""

from __future__ import annotations

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


def _launch(tmp_path: Path, *extra: str) -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("OUT", None)
    results = tmp_path / "results.json"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        _free_port(),
        str(SCRIPT),
        "--tiny",
        "--output_dir",
        str(tmp_path / "out"),
        "--results_json",
        str(results),
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return json.loads(results.read_text())


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
