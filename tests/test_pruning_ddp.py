"""2-process DDP (torchrun, gloo on CPU): both ranks end with identical pruning masks, even with rank-local
Wanda calibration batches that alone would give different masks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _worker(out_dir: str) -> None:  # runs under torchrun
    sys.path.insert(0, str(HERE))
    from safetensors.torch import save_file
    from tiny_models import lm_dataset, random_token_batch, tiny_gpt2
    from transformers import Trainer, TrainingArguments

    from hf_compress import PruningCallback, PruningConfig
    from hf_compress.pruning import compute_masks

    rank = int(os.environ["RANK"])
    model = tiny_gpt2(seed=0)
    # Each rank calibrates on different batches: scores differ, so masks must come from one rank.
    calibration = [random_token_batch(seed=100 + rank)]
    config = PruningConfig(
        method="wanda",
        sparsity=0.5,
        schedule="linear",
        start_step=0,
        end_step=4,
        frequency=2,
        num_calibration_batches=1,
    )
    local = compute_masks(model, config, calibration_data=calibration)
    pruning = PruningCallback(config, calibration_data=calibration)
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "run"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        ddp_backend="gloo",
    )
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(64), callbacks=[pruning])
    trainer.train()
    assert torch.distributed.get_world_size() == 2
    tensors = {f"mask.{k}": v.to(torch.uint8) for k, v in pruning.masks.items()}
    tensors.update({f"local.{k}": v.to(torch.uint8) for k, v in local.items()})
    tensors.update({f"param.{k}": v.detach().contiguous() for k, v in model.named_parameters()})
    save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()  # see tests/torchrun_utils.py


@pytest.mark.multiprocess
def test_ddp_two_ranks_identical_masks(tmp_path):
    from safetensors.torch import load_file
    from torchrun_utils import torchrun

    proc = torchrun([__file__, str(tmp_path)], env={"PYTHONPATH": str(HERE.parent)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    masks = [k for k in r0 if k.startswith("mask.")]
    assert len(masks) == 8
    for key in masks:
        assert torch.equal(r0[key], r1[key]), key
        assert r0[key].float().mean().item() == pytest.approx(0.5, abs=1e-3)
    # Without the broadcast the ranks would disagree: their local Wanda masks differ.
    assert any(not torch.equal(r0[k], r1[k]) for k in r0 if k.startswith("local."))
    for key in (k for k in r0 if k.startswith("param.")):  # DDP kept the weights in sync, zeros included
        assert torch.equal(r0[key], r1[key]), key


if __name__ == "__main__":
    _worker(sys.argv[1])
