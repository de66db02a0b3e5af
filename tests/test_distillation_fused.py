"""The fused LM-head distillation loss (no full logits) against the materialised losses: values and gradients."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ListDataset, tiny_llama

from hf_compress import DistillationConfig, DistillationTrainer, distillation_loss, fused_linear_distillation_loss
from hf_compress.distillation.lm_head import HeadInputCapture, OutputHead, UnsupportedHead, head_parameters

COMMON = dict(report_to="none", use_cpu=True, save_strategy="no", seed=0, logging_steps=1, disable_tqdm=True)


def _post(raw, scale, softcap):
    logits = raw * scale
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _reference(hs, ws, bs, ht, wt, bt, labels, mask, loss_type, temperature, alpha, beta, width, post_s, post_t):
    """The materialised path: full logits, then the library's pure losses (sum over kept positions)."""
    s_logits = _post(F.linear(hs, ws, bs), *post_s)[..., :width]
    t_logits = _post(F.linear(ht, wt, bt), *post_t)[..., :width]
    distill = distillation_loss(s_logits, t_logits, loss_type, temperature, beta, mask, reduction="sum")
    total = alpha * distill
    ce = None
    if alpha < 1:
        ce = F.cross_entropy(s_logits.reshape(-1, width), labels.masked_fill(~mask, -100).reshape(-1), reduction="sum")
        total = total + (1 - alpha) * ce
    return total, distill, ce


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    batch, seq, h_s, h_t = 3, 7, 8, 12
    data = dict(
        hs=torch.randn(batch, seq, h_s, generator=g),
        ws=torch.randn(44, h_s, generator=g) * 0.6,  # student head padded to 44 rows
        bs=torch.randn(44, generator=g) * 0.1,
        ht=torch.randn(batch, seq, h_t, generator=g),
        wt=torch.randn(48, h_t, generator=g) * 0.6,  # teacher head padded to 48 rows
        bt=torch.randn(48, generator=g) * 0.1,
        labels=torch.randint(0, 40, (batch, seq), generator=g),
        mask=torch.rand(batch, seq, generator=g) > 0.3,
    )
    data["labels"][0, :2] = -100
    return data


@pytest.mark.parametrize(
    "loss_type, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0), ("mse", 0)]
)
@pytest.mark.parametrize("alpha, temperature", [(0.3, 2.5), (1.0, 1.0), (0.0, 0.7)])
@pytest.mark.parametrize("post", [((1.0, None), (1.0, None)), ((0.5, 3.0), (2.0, None))])
def test_fused_equals_materialised_value_and_gradient(problem, loss_type, beta, alpha, temperature, post):
    p, width = problem, 40  # the shared (real) vocabulary of both padded heads
    leaves = {k: p[k].clone().requires_grad_() for k in ("hs", "ws", "bs")}
    ref, ref_distill, ref_ce = _reference(
        leaves["hs"], leaves["ws"], leaves["bs"], p["ht"], p["wt"], p["bt"], p["labels"], p["mask"],
        loss_type, temperature, alpha, beta, width, *post,
    )  # fmt: skip
    (ref * 0.7).backward()
    fused = {k: p[k].clone().requires_grad_() for k in ("hs", "ws", "bs")}
    total, distill, ce = fused_linear_distillation_loss(
        fused["hs"], fused["ws"], p["ht"], p["wt"], p["labels"],
        loss_type=loss_type, temperature=temperature, alpha=alpha, beta=beta, mask=p["mask"],
        student_bias=fused["bs"], teacher_bias=p["bt"], vocab_size=width,
        student_logit_scale=post[0][0], student_logit_softcap=post[0][1],
        teacher_logit_scale=post[1][0], teacher_logit_softcap=post[1][1], chunk_size=4,
    )  # fmt: skip
    (total * 0.7).backward()  # the incoming gradient scales the precomputed one
    torch.testing.assert_close(total, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(distill, ref_distill.detach(), rtol=1e-5, atol=1e-5)
    if ref_ce is not None:
        torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-5, atol=1e-5)
    for key in ("hs", "ws", "bs"):
        torch.testing.assert_close(fused[key].grad, leaves[key].grad, rtol=1e-4, atol=1e-6)
    assert fused["ws"].grad[width:].abs().max() == 0  # padded rows outside the shared range get no gradient


@pytest.mark.parametrize("chunk_size", [1, 5, 1000, None])
def test_chunking_does_not_change_the_result(problem, chunk_size):
    p = problem
    out = fused_linear_distillation_loss(
        p["hs"], p["ws"], p["ht"], p["wt"], p["labels"], mask=p["mask"], vocab_size=40, chunk_size=chunk_size
    )
    ref = fused_linear_distillation_loss(
        p["hs"], p["ws"], p["ht"], p["wt"], p["labels"], mask=p["mask"], vocab_size=40, chunk_size=21
    )
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_frozen_head_gets_no_gradient_and_hidden_gradient_is_right(problem):
    p = problem
    hs = p["hs"].clone().requires_grad_()
    total, *_ = fused_linear_distillation_loss(hs, p["ws"], p["ht"], p["wt"], p["labels"], vocab_size=40)
    total.backward()
    hs_ref = p["hs"].clone().requires_grad_()
    ones = torch.ones_like(p["mask"])
    ref, *_ = _reference(
        hs_ref, p["ws"], None, p["ht"], p["wt"], None, p["labels"], ones, "forward_kl", 2.0, 0.5, 0.5, 40,
        (1.0, None), (1.0, None),
    )  # fmt: skip
    ref.backward()
    assert p["ws"].grad is None
    torch.testing.assert_close(hs.grad, hs_ref.grad, rtol=1e-4, atol=1e-6)


def test_bf16_inputs_use_fp32_softmax_and_match_the_materialised_path(problem):
    """bf16 hidden states and heads: logits in bf16 (as nn.Linear gives them), temperature and softmax in fp32."""
    p = problem
    hs, ws = p["hs"].bfloat16().requires_grad_(), p["ws"][:40].bfloat16().requires_grad_()
    ht, wt = p["ht"].bfloat16(), p["wt"][:40].bfloat16()
    total, *_ = fused_linear_distillation_loss(hs, ws, ht, wt, p["labels"], temperature=3.0, mask=p["mask"])
    total.backward()
    hs_ref, ws_ref = p["hs"].bfloat16().requires_grad_(), p["ws"][:40].bfloat16().requires_grad_()
    s_logits, t_logits = hs_ref @ ws_ref.t(), ht @ wt.t()  # bf16 logits, as the model would return them
    ref = 0.5 * distillation_loss(s_logits, t_logits, "forward_kl", 3.0, mask=p["mask"], reduction="sum")
    ref = ref + 0.5 * F.cross_entropy(
        s_logits.float().reshape(-1, 40), p["labels"].masked_fill(~p["mask"], -100).reshape(-1), reduction="sum"
    )
    ref.backward()
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hs.grad.float(), hs_ref.grad.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(ws.grad.float(), ws_ref.grad.float(), rtol=2e-2, atol=2e-3)


def test_autocast_fp32_master_weights(problem):
    """Under bf16 autocast with fp32 weights: same values as the autocast materialised path, fp32 gradients."""
    p = problem
    hs, ws = p["hs"].clone().requires_grad_(), p["ws"][:40].clone().requires_grad_()
    hs_ref, ws_ref = p["hs"].clone().requires_grad_(), p["ws"][:40].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, *_ = fused_linear_distillation_loss(hs, ws, p["ht"], p["wt"][:40], p["labels"], alpha=0.8)
        s_logits, t_logits = F.linear(hs_ref, ws_ref), F.linear(p["ht"], p["wt"][:40])
        assert s_logits.dtype == torch.bfloat16
        ref = 0.8 * distillation_loss(s_logits, t_logits, "forward_kl", 2.0, reduction="sum")
        ref = ref + 0.2 * F.cross_entropy(s_logits.float().reshape(-1, 40), p["labels"].reshape(-1), reduction="sum")
    total.backward()
    ref.backward()
    assert ws.grad.dtype == torch.float32 and hs.grad.dtype == torch.float32
    torch.testing.assert_close(total, ref.detach(), rtol=1e-4, atol=1e-4)
    # bf16 rounding differs: the reference rounds the KL and CE logit gradients to bf16 separately, then adds them.
    torch.testing.assert_close(ws.grad, ws_ref.grad, rtol=2e-2, atol=5e-3)
    torch.testing.assert_close(hs.grad, hs_ref.grad, rtol=2e-2, atol=5e-3)


def test_no_data_dependent_shapes_or_host_reads():
    """On the meta device any `.item()`, boolean indexing or nonzero() would raise: the loss must run there."""
    hs = torch.empty(2, 6, 8, device="meta", requires_grad=True)
    ws = torch.empty(40, 8, device="meta", requires_grad=True)
    ht, wt = torch.empty(2, 6, 12, device="meta"), torch.empty(44, 12, device="meta")
    labels = torch.empty(2, 6, dtype=torch.long, device="meta")
    mask = torch.empty(2, 6, dtype=torch.bool, device="meta")
    for loss_type in ("forward_kl", "reverse_kl", "jsd", "mse"):
        total, *_ = fused_linear_distillation_loss(
            hs,
            ws,
            ht,
            wt,
            labels,
            loss_type=loss_type,
            mask=mask,
            vocab_size=40,
            chunk_size=5,
            student_logit_softcap=3.0,
        )
        total.backward()
    assert ws.grad.shape == (40, 8) and hs.grad.shape == (2, 6, 8)


def test_second_backward_through_the_same_graph_is_refused(problem):
    p = problem
    hs = p["hs"].clone().requires_grad_()
    total, *_ = fused_linear_distillation_loss(hs, p["ws"], p["ht"], p["wt"], p["labels"], vocab_size=40)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        total.backward()


def test_bad_arguments_are_named(problem):
    p = problem
    call = lambda **kw: fused_linear_distillation_loss(  # noqa: E731
        **{"student_hidden": p["hs"], "student_weight": p["ws"], "teacher_hidden": p["ht"], "teacher_weight": p["wt"],
           "labels": p["labels"], "vocab_size": 40, **kw}
    )  # fmt: skip
    with pytest.raises(ValueError, match="loss_type"):
        call(loss_type="kl")
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        call(alpha=1.5)
    with pytest.raises(ValueError, match="vocab_size"):
        call(vocab_size=None)  # 44 vs 48 rows: the shared range must be given
    with pytest.raises(ValueError, match="vocab_size"):
        call(vocab_size=45)
    with pytest.raises(ValueError, match="labels are needed"):
        call(labels=None)
    with pytest.raises(ValueError, match="mask has shape"):
        call(mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="student_weight must have shape"):
        call(student_weight=p["ws"].t())
    with pytest.raises(ValueError, match="leading"):
        call(teacher_hidden=p["ht"][:, :3])
    with pytest.raises(ValueError, match="chunk_size"):
        call(chunk_size=0)


# ------------------------------------------------------------------ the trainer


def _args(tmp_path, **kw):
    return DistillationConfig(output_dir=str(tmp_path / "out"), **{**COMMON, **kw})


def _batch(vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 10), generator=g)
    attention = torch.ones_like(ids)
    attention[1, -3:] = 0
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


class _HeadShapes:
    """Records the sequence length the student's head projects (1 = fused path, the full length = materialised)."""

    def __init__(self, module):
        self.lengths = []
        self.handle = module.register_forward_hook(lambda m, i, o: self.lengths.append(o.shape[1]))


def _loss_and_grads(tmp_path, student_fn, teacher, fused, batch, num_items=None, **kw):
    student = student_fn()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=_args(tmp_path, fused_lm_head_loss=fused, **kw)
    )
    shapes = _HeadShapes(student.get_output_embeddings())
    loss = trainer.compute_loss(student, batch, num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    parts = {k: torch.stack(v).mean() for k, v in trainer._loss_parts["train"].items()}
    return loss.detach(), grads, parts, shapes.lengths, trainer


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd", "mse"])
@pytest.mark.parametrize("alpha, tied", [(0.4, False), (1.0, True)])
def test_trainer_fused_equals_materialised(tmp_path, loss_type, alpha, tied):
    teacher = tiny_llama(seed=1, hidden=48)
    student_fn = lambda: tiny_llama(layers=1, seed=2, tie_word_embeddings=tied)  # noqa: E731
    kw = dict(loss_type=loss_type, alpha=alpha, temperature=1.7, jsd_beta=0.3, fused_lm_head_chunk_size=7)
    batch, items = _batch(), torch.tensor(19)
    fused = _loss_and_grads(tmp_path, student_fn, teacher, True, batch, items, **kw)
    plain = _loss_and_grads(tmp_path, student_fn, teacher, False, batch, items, **kw)
    assert fused[3] == [1] and plain[3] == [10]  # the fused step never projected more than one position
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    assert fused[1].keys() == plain[1].keys()
    for name in plain[1]:
        torch.testing.assert_close(fused[1][name], plain[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert fused[2].keys() == plain[2].keys()
    for key in plain[2]:
        torch.testing.assert_close(fused[2][key], plain[2][key], rtol=1e-5, atol=1e-6)


def test_trainer_padded_vocabulary_and_hidden_distillation(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(90)}, unk_token="t0")), pad_token="t0"
    )
    teacher = tiny_llama(vocab=128, seed=1)  # padded embedding: only the first 96 logits are compared
    student_fn = lambda: tiny_llama(vocab=96, layers=2, seed=2)  # noqa: E731
    kw = dict(alpha=0.5, hidden_loss_weight=0.7, processing_class=tokenizer)
    batch = _batch(vocab=90)
    results = []
    for fused in (True, False):
        student = student_fn()
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=_args(tmp_path, fused_lm_head_loss=fused, hidden_loss_weight=0.7),
            processing_class=kw["processing_class"],
        )
        loss = trainer.compute_loss(student, batch)
        loss.backward()
        assert trainer._shared_width == 96
        results.append((loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}, trainer))
    assert results[0][2]._fused_lm_heads is not None and "loss_hidden" in results[0][2]._loss_parts["train"]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for name in results[1][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


def _ragged_rows():
    g = torch.Generator().manual_seed(0)
    lengths = [12, 5, 9, 3, 12, 7, 10, 4]
    return ListDataset([{"input_ids": torch.randint(1, 96, (n,), generator=g)} for n in lengths])


def _pad_collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, 1:n] = r["input_ids"], 1, r["input_ids"][1:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_trainer_training_runs_match_with_gradient_accumulation(tmp_path):
    """Two optimizer steps, batch 8 vs 4 micro-batches of 2 with ragged lengths, fused and materialised."""
    teacher = tiny_llama(seed=1)
    finals = {}
    for fused in (True, False):
        for bs, ga in ((8, 1), (2, 4)):
            student = tiny_llama(layers=1, seed=2)
            trainer = DistillationTrainer(
                model=student,
                teacher_model=teacher,
                args=_args(
                    tmp_path,
                    max_steps=2,
                    per_device_train_batch_size=bs,
                    gradient_accumulation_steps=ga,
                    optim="sgd",
                    learning_rate=0.5,
                    max_grad_norm=0,
                    lr_scheduler_type="constant",
                    fused_lm_head_loss=fused,
                    fused_lm_head_chunk_size=5,
                ),
                train_dataset=ListDataset(_ragged_rows().rows * 2),
                data_collator=_pad_collate,
            )
            trainer.train()
            assert (trainer._fused_lm_heads is not None) == fused
            finals[(fused, bs)] = {k: v.detach().clone() for k, v in student.state_dict().items()}
    start = tiny_llama(layers=1, seed=2).state_dict()
    assert max((finals[(True, 8)][k] - start[k]).abs().max() for k in start) > 1e-3
    for key in start:
        for other in ((True, 2), (False, 8), (False, 2)):
            torch.testing.assert_close(finals[(True, 8)][key], finals[other][key], rtol=1e-4, atol=1e-6)


def test_trainer_peft_student_frozen_head(tmp_path):
    from peft import LoraConfig, get_peft_model

    teacher = tiny_llama(seed=1)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    student_fn = lambda: get_peft_model(tiny_llama(layers=1, seed=2), lora)  # noqa: E731
    batch = _batch()
    fused = _loss_and_grads(tmp_path, student_fn, teacher, True, batch)
    plain = _loss_and_grads(tmp_path, student_fn, teacher, False, batch)
    assert fused[3] == [1] and fused[4]._fused_lm_heads is not None
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    assert set(fused[1]) == set(plain[1]) and all("lora_" in n for n in fused[1])
    for name in plain[1]:
        torch.testing.assert_close(fused[1][name], plain[1][name], rtol=1e-4, atol=1e-6)


def test_trainer_falls_back_for_lora_on_the_head(tmp_path, caplog):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    student = get_peft_model(tiny_llama(layers=1, seed=2), lora)
    trainer = DistillationTrainer(model=student, teacher_model=tiny_llama(seed=1), args=_args(tmp_path))
    with caplog.at_level(logging.WARNING):
        loss = trainer.compute_loss(student, _batch())
    assert torch.isfinite(loss) and trainer._fused_lm_heads is None
    assert "PEFT adapter" in caplog.text and "materialised" in caplog.text


class _DoubledLogitsForCausalLM(type(tiny_llama())):
    """A forward that changes the logits after the head without saying so in its config."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_trainer_detects_undescribed_logit_postprocessing_and_falls_back(tmp_path, caplog):
    teacher = tiny_llama(seed=1)
    torch.manual_seed(2)
    student = _DoubledLogitsForCausalLM(tiny_llama(layers=1).config)
    reference = DistillationTrainer(
        model=student, teacher_model=teacher, args=_args(tmp_path, fused_lm_head_loss=False)
    ).compute_loss(student, _batch())
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path))
    with caplog.at_level(logging.WARNING):
        loss = trainer.compute_loss(student, _batch())  # the first step notices, then runs the materialised path
    assert trainer._fused_lm_heads is None and "config does not describe" in caplog.text
    torch.testing.assert_close(loss, reference)


def test_trainer_softcapped_model_uses_the_fused_path(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    def gemma(layers, seed):
        torch.manual_seed(seed)
        cfg = Gemma2Config(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, final_logit_softcapping=2.0,
        )  # fmt: skip
        return Gemma2ForCausalLM(cfg)

    teacher = gemma(2, 1)
    fused = _loss_and_grads(tmp_path, lambda: gemma(1, 2), teacher, True, _batch(), alpha=0.3)
    plain = _loss_and_grads(tmp_path, lambda: gemma(1, 2), teacher, False, _batch(), alpha=0.3)
    assert fused[4]._fused_lm_heads is not None and fused[4]._fused_lm_heads[0].logit_softcap == 2.0
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    for name in plain[1]:
        torch.testing.assert_close(fused[1][name], plain[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("quantize_head", [False, True])
def test_trainer_4bit_teacher(tmp_path, quantize_head):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(hidden=64, seed=1).save_pretrained(tmp_path / "teacher")
    skip = ["no_such_module"] if quantize_head else None  # None: transformers keeps lm_head unquantized
    teacher = AutoModelForCausalLM.from_pretrained(
        tmp_path / "teacher",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip),
    )
    assert (type(teacher.lm_head.weight).__name__ == "Params4bit") == quantize_head
    student_fn = lambda: tiny_llama(layers=1, seed=2)  # noqa: E731
    fused = _loss_and_grads(tmp_path, student_fn, teacher, True, _batch())
    plain = _loss_and_grads(tmp_path, student_fn, teacher, False, _batch())
    assert fused[4]._fused_lm_heads is not None
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-5)
    for name in plain[1]:
        torch.testing.assert_close(fused[1][name], plain[1][name], rtol=1e-3, atol=1e-5, msg=name)


def test_evaluation_returns_full_logits(tmp_path):
    student, teacher = tiny_llama(layers=1, seed=2), tiny_llama(seed=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path))
    student.eval()
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(student, _batch(), return_outputs=True)
        fused_loss = trainer.compute_loss(student, _batch())
    assert outputs.logits.shape == (3, 10, 96)
    torch.testing.assert_close(loss, fused_loss, rtol=1e-5, atol=1e-6)


def test_head_parameters_refuse_what_the_fused_loss_cannot_serve():
    head = torch.nn.Linear(8, 16)
    head.weight.ds_id = 3  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    with pytest.raises(UnsupportedHead, match="ZeRO-3"):
        head_parameters(OutputHead(head), student=False)
    plain = torch.nn.Linear(8, 16)
    assert head_parameters(OutputHead(plain), student=True)[0] is plain.weight


def test_head_input_capture_passes_only_the_last_position():
    model = tiny_llama(layers=1)
    ids = torch.randint(1, 96, (2, 6))
    with HeadInputCapture(model.lm_head) as captured:
        logits = model(input_ids=ids).logits
    assert captured.hidden.shape == (2, 6, 32) and logits.shape == (2, 1, 96)
    torch.testing.assert_close(logits, model(input_ids=ids).logits[:, -1:])
    assert captured.problem("student", ids.shape) is None
    assert "positions" in captured.problem("student", torch.Size([2, 7]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fused_lm_head_loss": "yes"}, "fused_lm_head_loss"),
        ({"fused_lm_head_chunk_size": 0}, "fused_lm_head_chunk_size"),
        ({"fused_lm_head_chunk_size": 2.5}, "fused_lm_head_chunk_size"),
    ],
)
def test_bad_fused_config_values_fail_with_the_field_name(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **kwargs)


@pytest.mark.multiprocess
def test_ddp_and_fsdp2_two_processes(tmp_path):
    """DDP: fused and materialised training end with the same students on both ranks. FSDP2 (accelerate's layout,
    torch's fully_shard on CPU): the same full gradients; a student head still sharded after forward is refused."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    tests = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tests.parent}{os.pathsep}{tests}"}
    script = tests / "scripts" / "fused_distill_distributed.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    proc = subprocess.run([*cmd, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((tmp_path / "rank0.json").read_text())
    assert info["world_size"] == 2
    states = {
        (kind, r): torch.load(tmp_path / f"ddp_{kind}_rank{r}.pt") for kind in ("fused", "plain") for r in (0, 1)
    }
    start = tiny_llama(layers=1, seed=2).state_dict()
    assert max((states[("fused", 0)][k] - start[k]).abs().max() for k in start) > 1e-3
    for key in start:
        assert torch.equal(states[("fused", 0)][key], states[("fused", 1)][key]), key
        torch.testing.assert_close(states[("fused", 0)][key], states[("plain", 0)][key], rtol=1e-4, atol=1e-6)
    assert info["teacher_head_after_forward"] == "DTensor"  # gathered with full_tensor() by the loss
    assert info["student_head_after_forward"] == "Parameter"  # unsharded: FSDP2 reduce-scatters its gradient
    assert "still sharded" in info["resharded_student_head_refused"]
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"fsdp2_rank{rank}.pt")
        assert grads["fused"].keys() == grads["plain"].keys()
        for name in grads["plain"]:
            torch.testing.assert_close(grads["fused"][name], grads["plain"][name], rtol=1e-4, atol=1e-6, msg=name)


def test_linear_subclass_head_is_not_trusted(tmp_path, caplog):
    """A Linear subclass (e.g. a QAT fake-quantized head) may not compute hidden @ weight.T: materialised path."""

    class ScaledLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 1.001

    student = tiny_llama(layers=1, seed=2)
    old = student.lm_head
    student.lm_head = ScaledLinear(old.in_features, old.out_features, bias=False)
    student.lm_head.weight = old.weight
    trainer = DistillationTrainer(model=student, teacher_model=tiny_llama(seed=1), args=_args(tmp_path))
    with caplog.at_level(logging.WARNING):
        loss = trainer.compute_loss(student, _batch())
    assert trainer._fused_lm_heads is None and "ScaledLinear" in caplog.text
    reference = DistillationTrainer(
        model=student, teacher_model=trainer.teacher_model, args=_args(tmp_path, fused_lm_head_loss=False)
    ).compute_loss(student, _batch())
    torch.testing.assert_close(loss, reference)
