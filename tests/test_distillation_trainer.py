"""DistillationTrainer end to end on tiny models built from configs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import (
    ListDataset,
    classification_dataset,
    lm_dataset,
    tiny_bert,
    tiny_distilbert,
    tiny_gpt2,
    tiny_llama,
)
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, Trainer, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_compress import DistillationConfig, DistillationTrainer

COMMON = dict(report_to="none", use_cpu=True, save_strategy="no", seed=0, logging_steps=1, disable_tqdm=True)


def _args(tmp_path, **kw):
    return DistillationConfig(output_dir=str(tmp_path / "out"), **{**COMMON, **kw})


class RuleTeacherForSequenceClassification(nn.Module):
    """A teacher that knows the true rule (token 7 present -> class 1), whatever the noisy labels say."""

    def __init__(self):
        super().__init__()
        self.config = BertConfig(num_labels=2)
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        has = (input_ids == 7).any(-1).float()
        return SequenceClassifierOutput(logits=torch.stack([1.5 - 3 * has, 3 * has - 1.5], -1))


def _flip_labels(ds, rate, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in ds.rows:
        r = dict(r)
        if torch.rand(1, generator=g).item() < rate:
            r["labels"] = 1 - r["labels"]
        rows.append(r)
    return ListDataset(rows)


def _accuracy(model, ds):
    model.eval()
    ids = torch.stack([r["input_ids"] for r in ds.rows])
    y = torch.tensor([r["labels"] for r in ds.rows])
    with torch.no_grad():
        return (model(input_ids=ids).logits.argmax(-1) == y).float().mean().item()


def test_distilled_student_beats_ce_only_student_on_noisy_labels(tmp_path):
    train = _flip_labels(classification_dataset(256, seed=3), rate=0.4)
    test = classification_dataset(200, seed=9)
    hp = dict(max_steps=80, per_device_train_batch_size=16, learning_rate=3e-3)
    distilled = tiny_bert(seed=5)
    DistillationTrainer(
        model=distilled,
        teacher_model=RuleTeacherForSequenceClassification(),
        args=_args(tmp_path, alpha=0.9, **hp),
        train_dataset=train,
    ).train()
    ce_only = tiny_bert(seed=5)
    Trainer(
        model=ce_only, args=TrainingArguments(output_dir=str(tmp_path / "ce"), **COMMON, **hp), train_dataset=train
    ).train()
    acc_distilled, acc_ce = _accuracy(distilled, test), _accuracy(ce_only, test)
    assert acc_distilled > acc_ce + 0.15, (acc_distilled, acc_ce)
    assert acc_distilled > 0.9


def test_loss_parts_are_logged_and_combine_to_the_loss(tmp_path):
    teacher, student = tiny_bert(seed=1), tiny_bert(layers=1, seed=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(tmp_path, max_steps=3, per_device_train_batch_size=8, alpha=0.3, hidden_loss_weight=2.0),
        train_dataset=classification_dataset(32),
        eval_dataset=classification_dataset(16, seed=1),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss_task" in h]
    assert len(logs) == 3
    for h in logs:
        expected = 0.3 * h["loss_distill"] + 0.7 * h["loss_task"] + 2.0 * h["loss_hidden"]
        assert h["loss"] == pytest.approx(expected, rel=1e-3)
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_loss_distill", "eval_loss_task", "eval_loss_hidden"} <= set(metrics)


def _pad_collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = r["input_ids"], 1, r["input_ids"]
        labels[i, : r.get("prompt", 0)] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _ragged_lm_rows():
    g = torch.Generator().manual_seed(0)
    lengths = [16, 5, 9, 3, 12, 7, 16, 4]
    return ListDataset(
        [{"input_ids": torch.randint(1, 96, (n,), generator=g), "prompt": i % 3} for i, n in enumerate(lengths)]
    )


@pytest.mark.parametrize("loss_type", ["forward_kl", "jsd"])
def test_token_loss_is_unchanged_by_gradient_accumulation(tmp_path, loss_type):
    """One step of batch 8 == one step of 4 micro-batches of 2 with very different token counts."""
    teacher = tiny_llama(seed=1)
    results = []
    for bs, ga in [(8, 1), (2, 4)]:
        student = tiny_llama(layers=1, seed=2)
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=_args(
                tmp_path,
                max_steps=1,
                per_device_train_batch_size=bs,
                gradient_accumulation_steps=ga,
                optim="sgd",
                learning_rate=1.0,
                max_grad_norm=0,
                loss_type=loss_type,
                lr_scheduler_type="constant",
            ),
            train_dataset=_ragged_lm_rows(),
            data_collator=_pad_collate,
        )
        trainer.train()
        results.append({k: v.detach().clone() for k, v in student.state_dict().items()})
    moved = max((results[0][k] - tiny_llama(layers=1, seed=2).state_dict()[k]).abs().max() for k in results[0])
    assert moved > 1e-3  # the step did something
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-4, atol=1e-6)


def test_padding_and_ignored_labels_do_not_change_the_causal_loss(tmp_path):
    teacher, student = tiny_gpt2(seed=1), tiny_gpt2(layers=1, seed=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, alpha=0.5))
    ids = torch.randint(1, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    short = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    padded_ids = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    padded = {
        "input_ids": padded_ids,
        "attention_mask": torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], 1).long(),
        "labels": torch.cat([ids, torch.full((1, 5), -100)], 1),
    }
    student.eval()
    with torch.no_grad():
        a = trainer.compute_loss(student, short)
        b = trainer.compute_loss(student, padded)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_peft_student_and_teacher_not_saved(tmp_path):
    from peft import LoraConfig, get_peft_model

    teacher = tiny_bert(seed=1)
    student = get_peft_model(
        tiny_bert(seed=2), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(tmp_path, max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2),
        train_dataset=classification_dataset(32),
    )
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    trainer.train()
    changed = {n for n, p in student.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n or "classifier" in n for n in changed)
    assert all(torch.equal(teacher_before[n], p) for n, p in teacher.named_parameters())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    trainer.save_model(str(tmp_path / "adapter"))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k or "classifier" in k for k in saved)


def test_student_saves_and_reloads_without_teacher_weights(tmp_path):
    teacher, student = tiny_bert(layers=3, hidden=48, seed=1), tiny_distilbert(seed=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(tmp_path, max_steps=2, per_device_train_batch_size=8, save_strategy="steps", save_steps=2),
        train_dataset=classification_dataset(32),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "out" / "checkpoint-2"):
        tensors = load_file(str(folder / "model.safetensors"))
        assert set(tensors) == set(student.state_dict())
        assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in student.parameters())
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "final")).eval()
    student.eval()
    ids = torch.randint(1, 96, (2, 8))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, student(input_ids=ids).logits)


def test_teacher_from_path_with_init_kwargs(tmp_path):
    tiny_bert(seed=1).save_pretrained(tmp_path / "teacher")
    trainer = DistillationTrainer(
        model=tiny_bert(layers=1, seed=2),
        teacher_model=str(tmp_path / "teacher"),
        args=_args(tmp_path, max_steps=1, teacher_model_init_kwargs={"dtype": "float64"}),
        train_dataset=classification_dataset(8),
    )
    assert trainer.teacher_model.dtype == torch.float64
    assert not trainer.teacher_model.training
    trainer.train()


def test_padded_vocabulary_is_compared_on_the_shared_range(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(90)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0"
    )
    teacher = tiny_llama(vocab=128, seed=1)  # 128 rows: the same 90 real tokens, padded embedding
    student = tiny_llama(vocab=96, layers=1, seed=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(tmp_path, max_steps=2, per_device_train_batch_size=4),
        train_dataset=lm_dataset(vocab=90),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer._shared_width == 96
    with pytest.raises(ValueError, match="processing_class"):
        DistillationTrainer(model=tiny_llama(vocab=96), teacher_model=teacher, args=_args(tmp_path))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"loss_type": "kl_forward"}, "loss_type"),
        ({"jsd_beta": 2.0}, "jsd_beta"),
        ({"hidden_loss_weight": -1.0}, "hidden_loss_weight"),
        ({"teacher_model_init_kwargs": "{not json"}, "teacher_model_init_kwargs"),
    ],
)
def test_bad_config_values_fail_with_the_field_name(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **kwargs)


def test_bad_teacher_student_pairs_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="3 classes but the student predicts 2"):
        DistillationTrainer(model=tiny_bert(num_labels=2), teacher_model=tiny_bert(num_labels=3), args=_args(tmp_path))
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(120)}, unk_token="t0"))
    )
    with pytest.raises(ValueError, match="different tokenizers"):
        DistillationTrainer(
            model=tiny_llama(vocab=96),
            teacher_model=tiny_llama(vocab=128),
            args=_args(tmp_path),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="does not exist"):
        DistillationTrainer(
            model=tiny_bert(), teacher_model=str(tmp_path / "no" / "such" / "dir"), args=_args(tmp_path)
        )


def test_hidden_distillation_on_model_without_hidden_states_fails_clearly(tmp_path):
    trainer = DistillationTrainer(
        model=tiny_bert(layers=2),
        teacher_model=RuleTeacherForSequenceClassification(),
        args=_args(tmp_path, max_steps=1, hidden_loss_weight=1.0, hidden_layer_mapping=[1, 1]),
        train_dataset=classification_dataset(8),
    )
    with pytest.raises(ValueError, match="teacher returned none"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_hidden_distillation_default_mapping_and_projection(tmp_path):
    teacher, student = tiny_bert(layers=4, hidden=48, seed=1), tiny_bert(layers=2, hidden=32, seed=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(tmp_path, max_steps=4, per_device_train_batch_size=8, hidden_loss_weight=1.0, learning_rate=1e-2),
        train_dataset=classification_dataset(32),
    )
    assert trainer._layer_mapping == [2, 4]
    assert trainer.hidden_projector[0].weight.shape == (48, 32)
    before = trainer.hidden_projector[0].weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.hidden_projector[0].weight)
    hidden = [h["loss_hidden"] for h in trainer.state.log_history if "loss_hidden" in h]
    assert hidden[-1] < hidden[0]


@pytest.mark.multiprocess
def test_ddp_two_processes_end_with_identical_students(tmp_path):
    script = Path(__file__).parent / "scripts" / "ddp_distill.py"
    from torchrun_utils import torchrun

    proc = torchrun([str(script), str(tmp_path)], env={"PYTHONPATH": str(Path(__file__).parent)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    info = json.loads((tmp_path / "rank0.json").read_text())
    assert info["world_size"] == 2 and info["changed"] and info["teacher_is_ddp"] is False
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_compression_callbacks_log_before_tensorboard(tmp_path):
    from transformers.integrations import TensorBoardCallback

    from hf_compress import PruningCallback, PruningConfig

    pruning = PruningCallback(PruningConfig(sparsity=0.5))
    trainer = DistillationTrainer(
        model=tiny_bert(layers=1, seed=2),
        teacher_model=tiny_bert(seed=1),
        args=_args(tmp_path, max_steps=2, report_to="tensorboard"),
        train_dataset=classification_dataset(16),
        callbacks=[pruning],
    )
    order = trainer.callback_handler.callbacks
    tensorboard = next(i for i, cb in enumerate(order) if isinstance(cb, TensorBoardCallback))
    assert order.index(pruning) < tensorboard
    trainer.train()
    assert any("sparsity_targeted" in h for h in trainer.state.log_history)


def test_every_public_name_is_importable():
    import hf_compress

    missing = [name for name in hf_compress.__all__ if getattr(hf_compress, name, None) is None]
    assert not missing
    assert hf_compress.__all__ == sorted(hf_compress.__all__)
