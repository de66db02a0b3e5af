"""Quantization-aware distillation: QATCallback inside DistillationTrainer."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import lm_dataset, random_token_batch, tiny_llama
from transformers import LlamaForCausalLM, TrainerCallback

pytest.importorskip("torchao")

from torchao.quantization.qat import FakeQuantizedLinear  # noqa: E402
from torchao.utils import TorchAOBaseTensor  # noqa: E402

from hf_compress import DistillationConfig, DistillationTrainer, QATCallback  # noqa: E402


class _Probe(TrainerCallback):
    def __init__(self):
        self.active = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.active.append(any(isinstance(m, FakeQuantizedLinear) for m in model.modules()))


def test_qat_inside_distillation_trainer(tmp_path):
    teacher = tiny_llama(hidden=64, layers=3, seed=1)
    student = tiny_llama(hidden=64, layers=2, seed=0)
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    probe = _Probe()
    args = DistillationConfig(
        output_dir=str(tmp_path / "qad"),
        alpha=0.5,
        temperature=2.0,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=lm_dataset(n=24),
        callbacks=[QATCallback(scheme="int8-dynamic-activation-int4-weight", group_size=32, start_step=1), probe],
    )
    trainer.train()

    assert probe.active == [False, True, True]  # the student trains with fake quantization from step 1
    # the teacher is never fake-quantized nor changed; the student learned
    assert not any(isinstance(m, FakeQuantizedLinear) for m in trainer.teacher_model.modules())
    assert all(torch.equal(teacher_before[k], v) for k, v in trainer.teacher_model.state_dict().items())
    assert not torch.equal(
        student_before["model.layers.0.mlp.up_proj.weight"], student.model.layers[0].mlp.up_proj.weight
    )
    # the distillation loss was part of the steps trained with fake quantization
    distill_logs = [h for h in trainer.state.log_history if "loss_distill" in h]
    assert len(distill_logs) >= 2 and all(h["loss_distill"] > 0 for h in distill_logs)
    # the quantized student is on disk and loads with stock from_pretrained
    quantized = LlamaForCausalLM.from_pretrained(tmp_path / "qad" / "quantized")
    assert isinstance(quantized.model.layers[1].self_attn.o_proj.weight, TorchAOBaseTensor)
    assert quantized.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.isfinite(quantized(**random_token_batch(vocab=96)).logits).all()
