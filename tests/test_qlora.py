"""QLoRA helpers on tiny models saved to disk and re-loaded in 4-bit (bitsandbytes runs on CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import classification_dataset, lm_dataset, tiny_bert, tiny_distilbert, tiny_gpt2, tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from peft import PeftModel  # noqa: E402

from hf_compress import find_lora_target_modules, load_qlora_model, merge_qlora, prepare_qlora  # noqa: E402
from hf_compress.qlora import loftq_init_  # noqa: E402

HIDDEN = 64  # bitsandbytes quantizes in blocks of 64 values


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama(hidden=HIDDEN, heads=4, kv_heads=2).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    tiny_bert(hidden=HIDDEN).save_pretrained(path)
    return path


def _args(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=8,
        learning_rate=3e-2,
        per_device_train_batch_size=8,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    defaults.update(kw)
    return TrainingArguments(**defaults)


def _lm_loss(model, rows):
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


@torch.no_grad()
def _quantized_state(model):
    """What each frozen 4-bit layer computes on the identity (its dequantized weight, transposed), by name.

    Read through the layer rather than from the packed bytes: bitsandbytes repacks 4-bit weights into a CPU
    layout at the first forward, which changes the storage but not the values."""
    return {
        name: m(torch.eye(m.in_features, dtype=torch.bfloat16)).float()
        for name, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


@pytest.fixture(scope="module")
def trained_llama(llama_dir, tmp_path_factory):
    """A QLoRA Llama trained a few steps; returns (model, quantized state before, loss before, loss after)."""
    tmp = tmp_path_factory.mktemp("train")
    model = load_qlora_model(llama_dir, lora_r=8, lora_dropout=0.0)
    train, probe = lm_dataset(n=64, seq=16), lm_dataset(n=16, seq=16, seed=1).rows
    before_state = _quantized_state(model)
    head_before = model.get_base_model().lm_head.weight.detach().clone()
    loss_before = _lm_loss(model, probe)
    Trainer(model=model, args=_args(tmp), train_dataset=train).train()
    return model, before_state, head_before, loss_before, _lm_loss(model, probe)


# ---------------------------------------------------------------------------------------------------------------
# target discovery
# ---------------------------------------------------------------------------------------------------------------
def test_find_lora_target_modules_skips_heads_and_disambiguates():
    assert find_lora_target_modules(tiny_llama(hidden=HIDDEN)) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert find_lora_target_modules(tiny_gpt2(hidden=HIDDEN)) == ["c_attn", "c_fc", "c_proj"]
    bert_targets = find_lora_target_modules(tiny_bert(hidden=HIDDEN))
    # plain "dense" would also adapt the pooler; the suffixes must select exactly the block layers
    assert bert_targets == ["intermediate.dense", "key", "output.dense", "query", "value"]
    assert find_lora_target_modules(tiny_llama(hidden=HIDDEN), ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    assert find_lora_target_modules(tiny_llama(hidden=HIDDEN), exclude_modules=r".*\.mlp\..*") == [
        "k_proj",
        "o_proj",
        "q_proj",
        "v_proj",
    ]


def test_bad_target_modules_lists_available_names(llama_dir):
    with pytest.raises(ValueError, match=r"'qq_proj' matches no Linear module.*q_proj.*v_proj"):
        load_qlora_model(llama_dir, target_modules=["qq_proj"])


# ---------------------------------------------------------------------------------------------------------------
# loading and training
# ---------------------------------------------------------------------------------------------------------------
def test_load_qlora_causal_lm_structure(trained_llama):
    model = trained_llama[0]
    assert isinstance(model, PeftModel)
    base = model.get_base_model()
    qconfig = base.config.quantization_config
    assert qconfig.load_in_4bit and qconfig.bnb_4bit_quant_type == "nf4" and qconfig.bnb_4bit_use_double_quant
    assert qconfig.bnb_4bit_compute_dtype == torch.bfloat16
    linear4 = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7  # every block Linear quantized
    assert type(base.lm_head) is nn.Linear  # head kept in full precision, without adapter
    assert model.peft_config["default"].lora_alpha == 16  # default 2 * r
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert getattr(base, "is_activation_checkpointing", False) or base.is_gradient_checkpointing
    checkpoint_fns = [
        m._gradient_checkpointing_func for m in base.modules() if hasattr(m, "_gradient_checkpointing_func")
    ]
    assert checkpoint_fns and all(f.keywords.get("use_reentrant") is False for f in checkpoint_fns)
    assert base.config.use_cache is False


def test_load_qlora_from_config_and_state_dict_matches_folder(llama_dir):
    """A config with in-memory weights (nothing on disk, quantized as loaded) gives the model the folder gives."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(llama_dir)
    state_dict = load_file(str(llama_dir / "model.safetensors"))
    from_folder = load_qlora_model(llama_dir, lora_r=8, lora_dropout=0.0)
    from_memory = load_qlora_model(config, lora_r=8, lora_dropout=0.0, state_dict=state_dict)
    assert isinstance(from_memory, PeftModel) and getattr(from_memory.get_base_model(), "is_loaded_in_4bit", False)
    assert _quantized_state(from_memory).keys() == _quantized_state(from_folder).keys()
    for name, value in _quantized_state(from_memory).items():
        assert torch.equal(value, _quantized_state(from_folder)[name]), name
    ids = torch.arange(12).view(1, 12) % 90 + 1
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(from_memory(input_ids=ids).logits, from_folder(input_ids=ids).logits)
    sixteen = load_qlora_model(config, load_in_4bit=False, lora_r=8, state_dict=state_dict)
    weight = sixteen.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, state_dict["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16))
    with pytest.raises(ValueError, match="state_dict"):
        load_qlora_model(config, lora_r=8)


def test_qlora_training_lowers_loss_and_keeps_base_frozen(trained_llama):
    model, before_state, head_before, loss_before, loss_after = trained_llama
    assert loss_after < 0.95 * loss_before
    after_state = _quantized_state(model)
    assert after_state.keys() == before_state.keys()
    for name, weight in before_state.items():
        assert torch.equal(after_state[name], weight), name
    assert torch.equal(model.get_base_model().lm_head.weight, head_before)
    moved = [m.lora_B["default"].weight.abs().sum() for m in model.modules() if hasattr(m, "lora_B") and m.lora_B]
    assert moved and all(x > 0 for x in moved)  # B starts at zero: every adapter learnt something


def test_sequence_classification_head_trains_in_full_precision(bert_dir, tmp_path):
    model = load_qlora_model(bert_dir, task="sequence-classification", lora_r=4, lora_dropout=0.0)
    base = model.get_base_model()
    assert not isinstance(base.classifier.original_module, bnb.nn.Linear4bit)
    assert isinstance(base.bert.encoder.layer[0].attention.self.query.base_layer, bnb.nn.Linear4bit)
    assert "lora_A" not in dict(base.bert.pooler.dense.named_children())  # pooler: no adapter
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "modules_to_save" in n} == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    head_before = base.classifier.modules_to_save["default"].weight.detach().clone()
    Trainer(model=model, args=_args(tmp_path, max_steps=3), train_dataset=classification_dataset(n=32)).train()
    assert not torch.equal(base.classifier.modules_to_save["default"].weight, head_before)


def test_sixteen_bit_lora_and_distilbert_head(tmp_path):
    path = tmp_path / "distilbert"
    tiny_distilbert(hidden=HIDDEN).save_pretrained(path)
    model = load_qlora_model(path, task="sequence-classification", load_in_4bit=False, lora_r=4)
    base = model.get_base_model()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    assert base.distilbert.transformer.layer[0].attention.q_lin.base_layer.weight.dtype == torch.bfloat16
    # DistilBERT's head is pre_classifier + classifier: both new, both trainable
    assert {"pre_classifier", "classifier"} <= set(model.peft_config["default"].modules_to_save)


def test_prepare_qlora_on_loaded_4bit_model(llama_dir):
    from transformers import BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    model = prepare_qlora(base, lora_r=4, target_modules=["q_proj", "v_proj"])
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    ids = torch.randint(0, 96, (2, 8))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert len(grads) == 4 and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_loftq_initialisation_reduces_quantization_error(llama_dir):
    model = load_qlora_model(llama_dir, lora_r=8, lora_alpha=32, loftq=True)
    full = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    checked = 0
    for name, module in model.get_base_model().named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        weight = full.get_submodule(name).weight.float()
        qw = module.get_base_layer().weight
        dequant = bnb.functional.dequantize_4bit(qw.data, qw.quant_state).float()
        delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
        assert torch.linalg.norm(weight - dequant - delta) < 0.9 * torch.linalg.norm(weight - dequant), name
        checked += 1
    assert checked == 14
    with pytest.raises(ValueError, match="loftq=True needs load_in_4bit=True"):
        load_qlora_model(llama_dir, loftq=True, load_in_4bit=False)
    with pytest.raises(ValueError, match="LoftQ needs the full-precision safetensors"):
        loftq_init_(model, llama_dir / "missing")


# ---------------------------------------------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------------------------------------------
def _adapter_on_dequantized_base(model, adapter_dir, base_dir):
    qconfig = model.get_base_model().config.quantization_config
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=qconfig, dtype=torch.float32)
    return PeftModel.from_pretrained(base.dequantize(), adapter_dir).eval()


def test_merge_qlora_reloads_and_matches_dequantized_adapter(trained_llama, llama_dir, tmp_path):
    model = trained_llama[0]
    model.save_pretrained(tmp_path / "adapter")
    eval_rows = lm_dataset(n=16, seq=16, seed=2)
    result = merge_qlora(model, tmp_path / "merged", dtype=torch.float32, requantize="nf4", eval_dataset=eval_rows)
    merged = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert not any("lora" in n for n, _ in merged.named_parameters())
    reference = _adapter_on_dequantized_base(model, tmp_path / "adapter", llama_dir)
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_logits, ref_logits = merged(ids).logits, reference(ids).logits
        quantized_logits = model.eval()(input_ids=ids).logits.float()
    torch.testing.assert_close(merged_logits, ref_logits, atol=1e-4, rtol=1e-4)
    # bf16 compute of the 4-bit model is the only gap left to the adapter-on-quantized-base model
    torch.testing.assert_close(merged_logits, quantized_logits, atol=0.1, rtol=0.05)

    # The usual merge into the original full-precision weights drifts further from what was trained.
    naive = merge_qlora(tmp_path / "adapter", tmp_path / "naive", dtype=torch.float32, dequantize_base=False)
    naive_logits = AutoModelForCausalLM.from_pretrained(naive.output_dir).eval()(ids).logits.detach()
    assert (naive_logits - quantized_logits).abs().mean() > (merged_logits - quantized_logits).abs().mean()

    metrics = result.metrics
    assert set(metrics) == {"adapter_on_quantized_base", "merged", "requantized"}
    ppl_q, ppl_m = metrics["adapter_on_quantized_base"]["eval_perplexity"], metrics["merged"]["eval_perplexity"]
    assert ppl_m == pytest.approx(ppl_q, rel=0.02)
    requantized = AutoModelForCausalLM.from_pretrained(result.requantized_output_dir)
    assert getattr(requantized, "is_loaded_in_4bit", False)
    assert result.requantized_output_dir.endswith("merged-nf4")


def test_merge_refuses_to_overwrite_a_model(trained_llama, tmp_path):
    model = trained_llama[0]
    model.save_pretrained(tmp_path / "adapter")
    target = tmp_path / "already"
    tiny_llama(hidden=HIDDEN).save_pretrained(target)
    with pytest.raises(FileExistsError, match=r"output_dir=.*already.*overwrite=True"):
        merge_qlora(tmp_path / "adapter", target)
    untouched = (target / "model.safetensors").read_bytes()
    result = merge_qlora(tmp_path / "adapter", target, overwrite=True, dtype="bfloat16")
    assert (target / "model.safetensors").read_bytes() != untouched
    assert AutoModelForCausalLM.from_pretrained(result.output_dir).dtype == torch.bfloat16


def test_merge_refuses_a_non_empty_folder_without_a_model_and_deletes_nothing(trained_llama, tmp_path):
    """Issue 16 item 1: a folder of the user's (no model in it) is neither emptied nor written into."""
    trained_llama[0].save_pretrained(tmp_path / "adapter")
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"output_dir=.*mine.*not empty.*notes.txt.*overwrite=True"):
        merge_qlora(tmp_path / "adapter", target)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "my notes"

    # the same for the re-quantized folder <output_dir>-nf4, checked before anything is written
    (tmp_path / "fresh-nf4").mkdir()
    (tmp_path / "fresh-nf4" / "data.csv").write_text("a,b\n")
    with pytest.raises(FileExistsError, match=r"requantized_output_dir=.*fresh-nf4.*not empty"):
        merge_qlora(tmp_path / "adapter", tmp_path / "fresh", requantize="nf4")
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in (tmp_path / "fresh-nf4").iterdir()) == ["data.csv"]


def test_merge_overwrite_replaces_only_library_files(trained_llama, tmp_path):
    """overwrite=True removes what the library writes (a stale shard included) and keeps the user's files."""
    trained_llama[0].save_pretrained(tmp_path / "adapter")
    target, requantized = tmp_path / "merged", tmp_path / "merged-nf4"
    for folder in (target, requantized):
        tiny_llama(hidden=HIDDEN).save_pretrained(folder)
        (folder / "model-00002-of-00002.safetensors").write_bytes(b"stale shard of an earlier save")
        (folder / "report.json").write_text("{}")
        (folder / "my_eval.txt").write_text("keep me")
        (folder / "sub").mkdir()
        (folder / "sub" / "model.safetensors").write_bytes(b"not at the top level: not ours to remove")
    result = merge_qlora(tmp_path / "adapter", target, requantize="nf4", overwrite=True, dtype="bfloat16")
    for folder in (target, requantized):
        assert (folder / "my_eval.txt").read_text() == "keep me"
        assert (folder / "sub" / "model.safetensors").is_file()
        assert not (folder / "model-00002-of-00002.safetensors").exists()
        assert not (folder / "report.json").exists()
    assert AutoModelForCausalLM.from_pretrained(result.output_dir).dtype == torch.bfloat16
    assert getattr(AutoModelForCausalLM.from_pretrained(result.requantized_output_dir), "is_loaded_in_4bit", False)


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------
def test_4bit_without_bitsandbytes_raises_install_hint(llama_dir, monkeypatch):
    import hf_compress.utils.imports as imports

    real = imports._is_available
    monkeypatch.setattr(imports, "_is_available", lambda name: False if name == "bitsandbytes" else real(name))
    with pytest.raises(ImportError, match=r"bitsandbytes.*pip install"):
        load_qlora_model(llama_dir)
    # 16-bit LoRA does not need it
    assert isinstance(load_qlora_model(llama_dir, load_in_4bit=False, lora_r=2), PeftModel)


def test_task_the_model_does_not_support(tmp_path):
    path = tmp_path / "distilbert"
    tiny_distilbert(hidden=HIDDEN).save_pretrained(path)
    with pytest.raises(ValueError, match=r"task='causal-lm' is not supported by model type 'distilbert'"):
        load_qlora_model(path, task="causal-lm")
    with pytest.raises(ValueError, match=r"task='summarize' is not supported"):
        load_qlora_model(path, task="summarize")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lora_r=0), "lora_r=0"),
        (dict(lora_dropout=1.5), "lora_dropout=1.5"),
        (dict(lora_alpha=-1), "lora_alpha=-1"),
        (dict(bnb_4bit_quant_type="int3"), "bnb_4bit_quant_type='int3'"),
        (dict(bnb_4bit_compute_dtype="int8"), "dtype 'int8'"),
    ],
)
def test_bad_arguments(llama_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_qlora_model(llama_dir, **kwargs)


def test_merge_bad_arguments(trained_llama, tmp_path):
    with pytest.raises(ValueError, match="requantize='int3'"):
        merge_qlora(trained_llama[0], tmp_path / "m", requantize="int3")
    with pytest.raises(ValueError, match="holds no adapter_config.json"):
        merge_qlora(tmp_path, tmp_path / "m")
    with pytest.raises(ValueError, match="must be a PeftModel"):
        merge_qlora(copy.deepcopy(tiny_llama()), tmp_path / "m")


# ---------------------------------------------------------------------------------------------------------------
# QLoRA in DistillationTrainer: a 4-bit student with adapters, a 4-bit teacher loaded from its path
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _kl_to_teacher(student, teacher, rows, temperature=2.0):
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
    student.eval()
    s = torch.log_softmax(student(**batch).logits.float() / temperature, -1)
    t = torch.log_softmax(teacher(**batch).logits.float() / temperature, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


@pytest.mark.slow
def test_qlora_student_learns_from_4bit_teacher(llama_dir, tmp_path):
    from transformers import BitsAndBytesConfig

    from hf_compress import DistillationConfig, DistillationTrainer

    teacher_dir = tmp_path / "teacher"
    tiny_llama(layers=3, hidden=HIDDEN, heads=4, kv_heads=2, seed=1).save_pretrained(teacher_dir)
    student = load_qlora_model(llama_dir, lora_r=8, lora_dropout=0.0)
    quantized_before = _quantized_state(student)
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        alpha=1.0,
        temperature=2.0,
        teacher_model_init_kwargs={
            "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
            "device_map": {"": "cpu"},
        },
        max_steps=8,
        learning_rate=3e-2,
        per_device_train_batch_size=8,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=str(teacher_dir), args=args, train_dataset=lm_dataset(n=64, seq=16)
    )
    teacher = trainer.teacher_model
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in teacher.modules()) == 3 * 7
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher_before = _quantized_state(teacher)
    probe = lm_dataset(n=16, seq=16, seed=3).rows
    kl_before = _kl_to_teacher(student, teacher, probe)
    trainer.train()
    kl_after = _kl_to_teacher(student, teacher, probe)
    assert kl_after < 0.9 * kl_before
    for name, weight in _quantized_state(student).items():  # the student's 4-bit base stayed frozen
        assert torch.equal(weight, quantized_before[name]), name
    for name, weight in _quantized_state(teacher).items():
        assert torch.equal(weight, teacher_before[name]), name
    assert all("lora_" in n for n, p in student.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# DDP: each rank loads its own 4-bit copy, gradients of the adapters are all-reduced
# ---------------------------------------------------------------------------------------------------------------
_DDP_SCRIPT = """
import json, os, sys
import torch
sys.path.insert(0, {tests!r})
from tiny_models import lm_dataset
from transformers import Trainer, TrainingArguments
from hf_compress import load_qlora_model

model = load_qlora_model({base!r}, lora_r=4, lora_dropout=0.0)
args = TrainingArguments(output_dir={out!r}, max_steps=3, learning_rate=3e-2, per_device_train_batch_size=4,
                         report_to="none", use_cpu=True, save_strategy="no", ddp_backend="gloo", disable_tqdm=True,
                         seed=int(os.environ["RANK"]))  # different seeds: only DDP keeps the ranks equal
trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(n=32, seq=16))
trainer.train()
device = str(next(p for p in model.parameters() if p.requires_grad).device)
state = {{n: p.detach().double().sum().item() for n, p in model.named_parameters() if p.requires_grad}}
with open(os.path.join({out!r}, f"rank{{os.environ['RANK']}}.json"), "w") as f:
    json.dump({{"world": trainer.args.world_size, "device": device, "state": state}}, f)
# Without this the gloo group's worker threads are torn down during interpreter shutdown, which can abort the
# process (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#190489).
torch.distributed.destroy_process_group()
"""


@pytest.mark.multiprocess
@pytest.mark.slow
def test_qlora_under_torchrun_ddp(llama_dir, tmp_path):
    import json
    import os

    from torchrun_utils import torchrun

    script = tmp_path / "ddp_qlora.py"
    script.write_text(_DDP_SCRIPT.format(tests=os.path.dirname(__file__), base=str(llama_dir), out=str(tmp_path)))
    proc = torchrun([str(script)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["device"] == "cpu" for r in ranks)
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for name, value in ranks[0]["state"].items():
        assert value == pytest.approx(ranks[1]["state"][name], rel=1e-6, abs=1e-9), name
    assert any(abs(v) > 0 for n, v in ranks[0]["state"].items() if "lora_B" in n)  # trained
