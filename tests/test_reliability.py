"""Reliability (issue 16): never train on NaN, fail before the first step, resume only what is sound, stop cleanly on
SIGTERM, bounded distributed waits, no process-lifetime caches of user data. One section per item of the issue."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import ListDataset, classification_dataset, lm_dataset, random_token_batch, tiny_bert, tiny_llama
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers import logging as hf_logging
from transformers.testing_utils import CaptureLogger

from hf_compress import (
    CorruptCheckpointError,
    DistillationConfig,
    DistillationTrainer,
    NonFiniteError,
    PruningCallback,
    PruningConfig,
    QATCallback,
    QATConfig,
    distillation_loss,
    last_complete_checkpoint,
    quantize_model,
)
from hf_compress.distillation.losses import fused_forward_kl_and_cross_entropy
from hf_compress.utils.checkpoints import checkpoint_problems

HERE = Path(__file__).resolve().parent
COMMON = dict(report_to="none", use_cpu=True, save_strategy="no", seed=0, logging_steps=1, disable_tqdm=True)
MARKER = 3  # a token id the data never holds otherwise (classification_dataset draws ids from 10..95)


def _dargs(tmp_path, **kw):
    return DistillationConfig(output_dir=str(tmp_path / "out"), **{**COMMON, **kw})


def _targs(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path / "out"), **{**COMMON, **kw})


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _all_finite(model):
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class PoisonedTeacher(nn.Module):
    """A real teacher whose logits are NaN (or inf) in the rows whose input holds MARKER: one bad row in a batch."""

    def __init__(self, inner, value=float("nan")):
        super().__init__()
        self.inner, self.config, self.value = inner, inner.config, value
        self.poisoned_batches: set[tuple] = set()

    def forward(self, input_ids=None, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        rows = (input_ids == MARKER).any(-1)
        if rows.any():
            self.poisoned_batches.add(tuple(input_ids.flatten().tolist()))
            out.logits = out.logits.masked_fill(rows.unsqueeze(-1), self.value)
        return out


def _with_marker(ds, indices):
    rows = []
    for i, r in enumerate(ds.rows):
        r = dict(r)
        if i in indices:
            r["input_ids"] = r["input_ids"].clone()
            r["input_ids"][0] = MARKER
        rows.append(r)
    return ListDataset(rows)


# ------------------------------------------------------------------------------ item 2: never train on NaN / inf
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_one_nonfinite_teacher_row_stops_the_step_naming_teacher_and_step(tmp_path, value):
    student = tiny_bert(layers=1, seed=2)
    train = _with_marker(classification_dataset(24), {13})
    trainer = DistillationTrainer(
        model=student,
        teacher_model=PoisonedTeacher(tiny_bert(seed=1), value),
        args=_dargs(tmp_path, max_steps=3, per_device_train_batch_size=8),
        train_dataset=train,
    )
    with pytest.raises(NonFiniteError, match=r"Training step (\d)") as info:
        trainer.train()
    step = trainer.state.global_step + 1
    message = str(info.value)
    assert f"Training step {step}:" in message
    assert "teacher logits: NaN/inf in 1 row(s)" in message and "loss_distill" in message
    assert "student logits" not in message  # the student's own forward was finite
    assert _all_finite(student)


def test_nonfinite_inputs_embeds_names_the_input(tmp_path):
    torch.manual_seed(0)
    rows = [{"inputs_embeds": torch.randn(6, 32), "labels": i % 2} for i in range(8)]
    rows[5]["inputs_embeds"][2, 7] = float("nan")
    student = tiny_bert(layers=1, seed=2)
    before = _params(student)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=tiny_bert(seed=1),
        args=_dargs(tmp_path, max_steps=2, per_device_train_batch_size=8),
        train_dataset=ListDataset(rows),
    )
    with pytest.raises(NonFiniteError, match=r"Training step 1: .*input 'inputs_embeds': NaN/inf in 1 value\(s\)"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in student.named_parameters())  # nothing was updated


def test_skip_policy_skips_bad_batches_counts_them_and_keeps_weights_finite(tmp_path):
    student = tiny_bert(layers=1, seed=2)
    teacher = PoisonedTeacher(tiny_bert(seed=1))
    train = _with_marker(classification_dataset(64), {3, 40})
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_dargs(tmp_path, max_steps=8, per_device_train_batch_size=8, nonfinite="skip"),
        train_dataset=train,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 8 and trainer.state.global_step == 8
    skipped = len(teacher.poisoned_batches)
    assert skipped in (1, 2)
    assert logs[-1]["nonfinite_skipped"] == skipped
    assert sum(h["loss"] == 0 and "loss_distill" not in h for h in logs) == skipped  # skipped: no loss parts
    assert all(torch.isfinite(torch.tensor([h["loss"], h.get("loss_distill", 0.0)])).all() for h in logs)
    assert _all_finite(student)


def test_skipped_batch_contributes_an_exactly_zero_gradient(tmp_path):
    """The skip loss of a batch whose student forward is finite, and of one whose forward is NaN: zero gradients."""
    student = tiny_bert(layers=1, seed=2)
    trainer = DistillationTrainer(
        model=student, teacher_model=tiny_bert(seed=1), args=_dargs(tmp_path), train_dataset=classification_dataset(8)
    )
    batch = {k: torch.stack([r[k] for r in classification_dataset(4).rows]) for k in ("input_ids", "attention_mask")}
    for finite in (True, False):
        student.zero_grad()
        embeds = student.get_input_embeddings()(batch["input_ids"])
        if not finite:
            embeds = embeds.masked_fill(torch.rand_like(embeds) < 0.01, float("nan"))
        outputs = student(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        trainer._zero_gradient_loss(student, outputs, student_finite=finite).backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_temperature_nan_inf_rejected_in_config(tmp_path):
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="temperature="):
            _dargs(tmp_path, temperature=value)


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd", "mse"])
def test_losses_compute_in_fp32_for_low_precision_logits(loss_type):
    """bf16 logits give the loss of their fp32 values (softmax and temperature in fp32), and a finite result."""
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(4, 7, 50, generator=g) * 30).bfloat16()
    t = (torch.randn(4, 7, 50, generator=g) * 30).bfloat16()
    low = distillation_loss(s, t, loss_type, temperature=0.5)
    full = distillation_loss(s.float(), t.float(), loss_type, temperature=0.5)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    torch.testing.assert_close(low, full, rtol=0, atol=0)
    labels = torch.randint(0, 50, (4, 7), generator=g)
    total, _, _ = fused_forward_kl_and_cross_entropy(s, t, labels, 0.5, 0.5)
    reference, _, _ = fused_forward_kl_and_cross_entropy(s.float(), t.float(), labels, 0.5, 0.5)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    torch.testing.assert_close(total, reference, rtol=0, atol=0)


# ------------------------------------------------------------------------ item 3: quantizing a saved classifier
def test_quantize_model_from_a_folder_keeps_the_classifier_in_full_precision(tmp_path):
    pytest.importorskip("bitsandbytes")
    model = tiny_bert(num_labels=2)
    model.save_pretrained(tmp_path / "saved")
    from_path = quantize_model(str(tmp_path / "saved"), "nf4")
    in_memory = quantize_model(model, "nf4")
    assert type(from_path.classifier) is nn.Linear
    assert type(from_path.classifier) is type(in_memory.classifier)
    assert type(from_path.bert.encoder.layer[0].intermediate.dense).__name__ == "Linear4bit"
    ids = torch.randint(10, 96, (2, 8))
    torch.testing.assert_close(from_path(input_ids=ids).logits, in_memory(input_ids=ids).logits)


# --------------------------------------------------------- item 5: failures before the first step, not after it
def test_task_that_contradicts_the_model_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="task='causal-lm' does not match the student BertForSequenceClassification"):
        DistillationTrainer(
            model=tiny_bert(),
            teacher_model=tiny_bert(),
            args=_dargs(tmp_path, task="causal-lm"),
            train_dataset=classification_dataset(8),
        )


@pytest.mark.parametrize("label, nonfinite", [(5, "raise"), (-1, "raise"), (5, "off"), (-1, "skip")])
def test_out_of_range_labels_fail_on_the_first_batch(tmp_path, label, nonfinite):
    ds = classification_dataset(16)
    ds.rows[9]["labels"] = label
    student = tiny_bert(layers=1, seed=2)
    before = _params(student)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=tiny_bert(seed=1),
        args=_dargs(tmp_path, max_steps=2, per_device_train_batch_size=16, nonfinite=nonfinite),
        train_dataset=ds,
    )
    with pytest.raises(ValueError, match=rf"Training step 1: .*labels: 1 value\(s\) outside \[0, 2\).*\[{label}\]"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in student.named_parameters())


def test_token_ids_beyond_the_teachers_vocabulary_are_named(tmp_path):
    teacher = tiny_bert(seed=1)
    teacher.resize_token_embeddings(50)  # the student has 96 rows; ids 50..95 do not exist for the teacher
    trainer = DistillationTrainer(
        model=tiny_bert(layers=1, seed=2),
        teacher_model=teacher,
        args=_dargs(tmp_path, max_steps=2, per_device_train_batch_size=8),
        train_dataset=classification_dataset(16),
    )
    with pytest.raises(ValueError, match=r"Training step 1: .*input_ids: \d+ value\(s\) outside \[0, 50\)"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_qat_group_size_one_is_a_clean_error():
    pytest.importorskip("torchao")
    for scheme in ("int8-dynamic-activation-int8-weight", "int8-dynamic-activation-int4-weight"):
        with pytest.raises(ValueError, match="group_size=1 is not allowed: it must be an integer >= 2"):
            QATConfig(scheme=scheme, group_size=1)
        with pytest.raises(ValueError, match="group_size=1"):
            QATCallback(scheme=scheme, group_size=1)


def test_unwritable_qat_output_folder_fails_before_the_first_step(tmp_path):
    pytest.importorskip("torchao")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is needed")
    model = tiny_llama()
    before = _params(model)
    qat = QATCallback(scheme="int4-weight-only", group_size=16, output_dir=str(blocker / "quantized"))
    trainer = Trainer(model=model, args=_targs(tmp_path, max_steps=3), train_dataset=lm_dataset(16), callbacks=[qat])
    with pytest.raises(ValueError, match="QATCallback output_dir=.*blocker.* is an existing file"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    existing = tmp_path / "results.txt"
    existing.write_text("user data")
    with pytest.raises(ValueError, match="output_dir=.*results.txt.* is an existing file"):
        DistillationConfig(output_dir=str(existing), report_to="none")
    with pytest.raises(ValueError, match="output_dir"):
        QATCallback(output_dir=str(existing))
    assert existing.read_text() == "user data"


def test_pruning_schedule_beyond_max_steps(tmp_path):
    late = PruningCallback(PruningConfig(sparsity=0.5, start_step=10))
    trainer = Trainer(
        model=tiny_llama(), args=_targs(tmp_path, max_steps=4), train_dataset=lm_dataset(16), callbacks=[late]
    )
    with pytest.raises(ValueError, match=r"start_step=10 is after the run's last step \(max_steps=4\)"):
        trainer.train()
    assert trainer.state.global_step == 0

    config = PruningConfig(sparsity=0.6, schedule="linear", start_step=0, end_step=8, frequency=2)
    short = PruningCallback(config)
    trainer = Trainer(
        model=tiny_llama(), args=_targs(tmp_path, max_steps=4), train_dataset=lm_dataset(16), callbacks=[short]
    )
    logger = hf_logging.get_logger("hf_compress.pruning.callback")
    with CaptureLogger(logger) as captured:
        trainer.train()
    assert "end_step=8 is after the run's last step (max_steps=4)" in captured.out
    assert "stops at step 4 with sparsity 0.3000 instead of 0.6000" in captured.out
    assert short.sparsity == pytest.approx(0.3, abs=1e-3)  # what the warning said the run would reach


# ----------------------------------------------------------------- item 4: resume verifies what it loads
PRUNE = dict(sparsity=0.5, schedule="linear", start_step=0, end_step=4, frequency=2)


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory):
    """checkpoint-4 of a pruning run (masks at 50%), written once for the module."""
    root = tmp_path_factory.mktemp("pruned")
    args = _targs(root, max_steps=4, save_strategy="steps", save_steps=4, per_device_train_batch_size=4)
    callback = PruningCallback(PruningConfig(**PRUNE))
    Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(32), callbacks=[callback]).train()
    return root / "out" / "checkpoint-4", {k: v.clone() for k, v in callback.masks.items()}


def _resume(folder, tmp_path, **kw):
    callback = PruningCallback(PruningConfig(**PRUNE))
    args = _targs(tmp_path, max_steps=6, per_device_train_batch_size=4, **kw)
    trainer = Trainer(model=tiny_llama(seed=7), args=args, train_dataset=lm_dataset(32), callbacks=[callback])
    trainer.train(resume_from_checkpoint=str(folder))
    return callback


def _copy(checkpoint, tmp_path):
    folder = tmp_path / "elsewhere" / "checkpoint-4"  # not under the resumed run's output_dir
    shutil.copytree(checkpoint, folder)
    return folder, folder / "pruning_masks.safetensors"


def test_sound_checkpoint_resumes_with_the_saved_masks(pruned_checkpoint, tmp_path):
    checkpoint, masks = pruned_checkpoint
    assert (checkpoint / "pruning_masks.safetensors.sha256").is_file()
    folder, _ = _copy(checkpoint, tmp_path)
    resumed = _resume(folder, tmp_path)
    assert all(torch.equal(resumed.masks[n], masks[n]) for n in masks)


def _flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # a mask byte: True <-> False
    path.write_bytes(bytes(data))


def _all_true(path):
    save_file({k: torch.ones_like(v) for k, v in load_file(path).items()}, path)


def _all_true_with_fresh_checksum(path):
    from hf_compress.utils.checkpoints import write_with_checksum

    tensors = {k: torch.ones_like(v) for k, v in load_file(path).items()}
    from safetensors.torch import save

    write_with_checksum(path, save(tensors))


def _transposed(path):
    save_file({k: v.t().contiguous() for k, v in load_file(path).items()}, path)
    os.remove(f"{path}.sha256")


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    os.remove(f"{path}.sha256")


def _uint8(path):
    save_file({k: v.to(torch.uint8) for k, v in load_file(path).items()}, path)
    os.remove(f"{path}.sha256")


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (_flip_payload_byte, "checksum mismatch"),
        (_all_true, "checksum mismatch"),
        (_all_true_with_fresh_checksum, r"masks have sparsity 0.0000 but .* records a target of 0.5000"),
        (_transposed, r"the mask of '.*' has shape \(\d+, \d+\) but the weight has"),
        (_truncated, "truncated"),
        (_uint8, "has dtype torch.uint8; masks are torch.bool"),
    ],
)
def test_corrupted_mask_file_is_refused_naming_file_and_problem(pruned_checkpoint, tmp_path, corrupt, match):
    folder, masks_file = _copy(pruned_checkpoint[0], tmp_path)
    corrupt(masks_file)
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        _resume(folder, tmp_path)
    assert str(masks_file) in str(info.value)


def test_removed_callback_state_is_a_clear_error_at_load(pruned_checkpoint, tmp_path):
    folder, _ = _copy(pruned_checkpoint[0], tmp_path)
    state = json.loads((folder / "trainer_state.json").read_text())
    del state["stateful_callbacks"]["PruningCallback"]
    (folder / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="holds no PruningCallback state"):
        _resume(folder, tmp_path)


def test_callback_added_on_resume_still_saves(pruned_checkpoint, tmp_path):
    """A resumed checkpoint written without a QAT callback: no KeyError at the next save."""
    pytest.importorskip("torchao")
    folder, _ = _copy(pruned_checkpoint[0], tmp_path)
    qat = QATCallback(scheme="int4-weight-only", group_size=16, start_step=5, save_quantized=False)
    pruning = PruningCallback(PruningConfig(**PRUNE))
    args = _targs(tmp_path, max_steps=6, per_device_train_batch_size=4, save_strategy="steps", save_steps=1)
    trainer = Trainer(model=tiny_llama(seed=7), args=args, train_dataset=lm_dataset(32), callbacks=[pruning, qat])
    trainer.train(resume_from_checkpoint=str(folder))
    state = json.loads((tmp_path / "out" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["QATCallback"]["attributes"]["fake_quant_inserted_at"] == 5


def _half_written(folder, how):
    if how == "no trainer state":
        (folder / "trainer_state.json").unlink()
    elif how == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "masks missing":
        (folder / "pruning_masks.safetensors").unlink()
        (folder / "pruning_masks.safetensors.sha256").unlink()
    elif how == "truncated optimizer":
        optimizer = folder / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[:2000])


@pytest.mark.parametrize("how", ["no trainer state", "truncated weights", "masks missing", "truncated optimizer"])
def test_auto_resume_skips_a_half_written_checkpoint(tmp_path, how):
    teacher = tiny_llama(seed=1)
    args = _dargs(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=4)
    DistillationTrainer(
        model=tiny_llama(layers=1, seed=2),
        teacher_model=teacher,
        args=args,
        train_dataset=lm_dataset(32),
        callbacks=[PruningCallback(PruningConfig(**PRUNE))],
    ).train()
    out = tmp_path / "out"
    _half_written(out / "checkpoint-4", how)
    assert checkpoint_problems(out / "checkpoint-4") and not checkpoint_problems(out / "checkpoint-2")
    logger = hf_logging.get_logger("hf_compress.utils.checkpoints")
    with CaptureLogger(logger) as captured:
        assert last_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert "Skipping incomplete checkpoint" in captured.out and "checkpoint-4" in captured.out

    resumed = DistillationTrainer(
        model=tiny_llama(layers=1, seed=5),
        teacher_model=teacher,
        args=_dargs(tmp_path, max_steps=4, per_device_train_batch_size=4),
        train_dataset=lm_dataset(32),
        callbacks=[PruningCallback(PruningConfig(**PRUNE))],
    )
    resumed.train(resume_from_checkpoint=True)
    assert resumed.args.resume_from_checkpoint == str(out / "checkpoint-2")
    assert resumed.state.global_step == 4
    with pytest.raises(CorruptCheckpointError, match="is not a complete checkpoint"):
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-4"))


# ------------------------------------------------------------ item 6: SIGTERM saves, exits, resumes exactly
def _step_reached(progress: Path) -> int:
    try:
        return int(progress.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_sigterm_saves_a_checkpoint_exits_and_resumes_bit_identically(tmp_path):
    sys.path.insert(0, str(HERE / "scripts"))
    import graceful_run

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    interrupted = subprocess.Popen(
        [sys.executable, str(HERE / "scripts" / "graceful_run.py"), str(tmp_path), "interrupt"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess: the same float reductions, so bit-identical results
    try:
        graceful_run.run(str(tmp_path), "full")  # the uninterrupted reference, while the subprocess starts
        deadline = time.monotonic() + 300
        while _step_reached(tmp_path / "progress") < 3:
            assert interrupted.poll() is None, interrupted.communicate()[0][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        interrupted.send_signal(signal.SIGTERM)
        output = interrupted.communicate(timeout=120)[0]
        assert interrupted.returncode == 128 + signal.SIGTERM, output[-3000:]
        assert "SIGTERM received; saving a checkpoint" in output
        checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
        assert len(checkpoints) == 1, checkpoints  # save_steps=100: only the signal saved
        stopped = int(checkpoints[0].name.split("-")[1])
        assert 3 <= stopped < graceful_run.MAX_STEPS
        assert not checkpoint_problems(checkpoints[0])  # masks included: the exit waited for PruningCallback.on_save
        assert not (tmp_path / "interrupt.safetensors").exists()  # it exited in training, before the script's end
        graceful_run.run(str(tmp_path), "resume")
    finally:
        torch.set_num_threads(threads)
        if interrupted.poll() is None:
            interrupted.kill()
    reference, resumed = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "resume.safetensors")
    assert set(reference) == set(resumed) and any(k.startswith("mask.") for k in reference)
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


# ------------------------------------------------------------------ item 7: a stalled rank fails the job in time
@pytest.mark.multiprocess
def test_stalled_rank_makes_the_other_fail_within_ddp_timeout(tmp_path):
    timeout_s, margin_s = 5, 10
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    ranks = []
    for rank in (0, 1):
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(HERE.parent),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        command = [sys.executable, str(HERE / "scripts" / "stalled_rank.py"), str(tmp_path), str(timeout_s)]
        ranks.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        output = ranks[0].communicate(timeout=300)[0]
        ended = time.time()
        stalled_at = float((tmp_path / "stalled_at").read_text())
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()  # SIGKILL also ends a stopped process
                proc.wait()
    assert ranks[0].returncode != 0
    assert "TimeoutError" in output and "PruningCallback at step 2: broadcasting the pruning masks" in output
    assert ended - stalled_at < timeout_s + margin_s, (ended - stalled_at, output[-3000:])


# ------------------------------------------------------------- item 9: no process-lifetime cache of user data
def test_calibration_batches_are_freed_with_their_callback(tmp_path):
    from hf_compress.pruning import callback as pruning_module

    calibration = [random_token_batch(seed=i) for i in range(2)]
    probe = weakref.ref(calibration[0]["input_ids"])
    config = PruningConfig(method="wanda", sparsity=0.5, num_calibration_batches=2)
    pruning = PruningCallback(config, calibration_data=calibration)
    key = pruning.calibration_key
    trainer = Trainer(
        model=tiny_llama(), args=_targs(tmp_path, max_steps=2), train_dataset=lm_dataset(16), callbacks=[pruning]
    )
    trainer.train()
    restored = PruningCallback(**pruning.state()["args"])  # what restore_callback_states_from_checkpoint builds
    assert restored.calibration_data is calibration
    del trainer, pruning, restored, calibration
    gc.collect()
    assert key not in pruning_module._LIVE_CALLBACKS
    assert probe() is None  # nothing in the library holds the user's batches any more
    assert PruningCallback(config.to_dict() | {"method": "magnitude"}, calibration_key=key).calibration_data is None
