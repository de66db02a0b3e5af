"""Fine-tune a causal LM with quantization-aware training (QAT), as an ordinary Trainer script.

The only change to a plain fine-tuning script is one callback: `QATCallback` trains in full precision until
`--start-step`, then with torchao fake quantization (int4 weights by default), and at the end writes the real
quantized model to `<output-dir>/quantized`, which stock `from_pretrained` loads. The script then compares the
perplexity of that model with post-training quantization (PTQ) of the same model fine-tuned without QAT.

With `--distill-from`, the fine-tune is quantization-aware distillation: `DistillationTrainer` trains the
fake-quantized student to match a full-precision teacher (`--distill-from self`: a frozen copy of the starting model).

Online (hub names are the defaults):
    python examples/qat_finetune.py
    python examples/qat_finetune.py --model HuggingFaceTB/SmolLM2-135M --scheme int8-dynamic-activation-int4-weight

Offline, fully local (WikiText-2 from ../shared/data, a word-level tokenizer trained on it, a small Llama from a
config, pre-trained here first for a few hundred steps):
    python examples/qat_finetune.py --offline
    python examples/qat_finetune.py --offline --distill-from self
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from hf_compress import (
    DistillationConfig,
    DistillationTrainer,
    QATCallback,
    QATConfig,
    compute_perplexity,
    save_qat_model,
)
from hf_compress.utils.threads import configure_threads

LOCAL_WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext2"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M", help="causal LM name or local path")
    p.add_argument("--dataset", default="Salesforce/wikitext", help="hub dataset with a `text` column")
    p.add_argument("--dataset-config", default="wikitext-2-raw-v1")
    p.add_argument("--offline", action="store_true", help="local WikiText-2, local tokenizer, small Llama")
    p.add_argument("--output-dir", default="outputs/qat_finetune")
    p.add_argument("--scheme", default="int4-weight-only", help="QAT scheme, see hf_compress.QATConfig")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--start-step", type=int, default=0, help="optimizer steps in full precision before QAT")
    p.add_argument("--max-steps", type=int, default=None, help="default: 1000 online, 150 offline")
    p.add_argument(
        "--distill-from",
        default=None,
        help="teacher name/path for quantization-aware distillation, "
        "or 'self' for a frozen full-precision copy of the model",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=None, help="tokens per example; default 512 online, 64 offline")
    p.add_argument("--learning-rate", type=float, default=None, help="default 2e-5 online, 5e-4 offline")
    p.add_argument("--max-eval-blocks", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 on small or busy machines, see hf_compress.utils.threads)",
    )
    return p.parse_args()


def offline_setup(args):
    """Word-level tokenizer trained on WikiText-2 and a small Llama pre-trained on it (there is no hub here)."""
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not LOCAL_WIKITEXT.is_dir():
        raise SystemExit(f"--offline needs WikiText-2 at {LOCAL_WIKITEXT.resolve()}")
    splits = {}
    for split, name in (("train", "train"), ("validation", "valid")):
        lines = (LOCAL_WIKITEXT / f"{name}.txt").read_text(encoding="utf-8").splitlines()
        splits[split] = Dataset.from_dict({"text": [line for line in lines if line.strip()]})
    data = DatasetDict(splits)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(
        data["train"]["text"], trainers.WordLevelTrainer(vocab_size=4096, special_tokens=["<unk>", "<eos>"])
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    config = LlamaConfig(
        vocab_size=max(tokenizer.get_vocab().values()) + 1,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.block_size,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    return data, tokenizer, LlamaForCausalLM(config)


def group_texts(data, tokenizer, block_size):
    def tokenize(batch):
        return tokenizer([t + tokenizer.eos_token for t in batch["text"]])

    def chunk(batch):
        ids = [i for row in batch["input_ids"] for i in row]
        n = (len(ids) // block_size) * block_size
        return {"input_ids": [ids[i : i + block_size] for i in range(0, n, block_size)]}

    data = data.map(tokenize, batched=True, remove_columns=data["train"].column_names)
    return data.map(chunk, batched=True, remove_columns=data["train"].column_names)


def perplexity(model, dataset, n_blocks):
    rows = dataset.select(range(min(n_blocks, len(dataset))))
    batches = [{"input_ids": torch.tensor(rows[i : i + 16]["input_ids"])} for i in range(0, len(rows), 16)]
    with torch.no_grad():
        return compute_perplexity(model, batches)


def main():
    args = parse_args()
    configure_threads(args.num_threads)
    started = time.time()
    args.max_steps = args.max_steps or (150 if args.offline else 1000)
    args.block_size = args.block_size or (64 if args.offline else 512)
    lr = args.learning_rate or (5e-4 if args.offline else 2e-5)
    if args.offline:
        raw, tokenizer, model = offline_setup(args)
    else:
        from datasets import load_dataset

        raw = load_dataset(args.dataset, args.dataset_config)
        raw = raw.filter(lambda r: len(r["text"].strip()) > 0)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = group_texts(raw, tokenizer, args.block_size)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    common = dict(
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    if args.offline:  # no pre-trained checkpoint offline: pre-train the small model briefly so QAT has something
        Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=f"{args.output_dir}/pretrain", max_steps=300, **{**common, "learning_rate": 3e-3}
            ),
            train_dataset=data["train"],
            data_collator=collator,
        ).train()
    base = copy.deepcopy(model)

    # Quantization-aware fine-tune: the ordinary Trainer (or DistillationTrainer) plus one callback.
    qat = QATCallback(scheme=args.scheme, group_size=args.group_size, start_step=args.start_step, overwrite=True)
    if args.distill_from:
        teacher = (
            copy.deepcopy(base)
            if args.distill_from == "self"
            else AutoModelForCausalLM.from_pretrained(args.distill_from)
        )
        trainer = DistillationTrainer(
            model=model,
            teacher_model=teacher,
            train_dataset=data["train"],
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=[qat],
            args=DistillationConfig(
                output_dir=f"{args.output_dir}/qat", max_steps=args.max_steps, alpha=0.5, temperature=2.0, **common
            ),
        )
    else:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(output_dir=f"{args.output_dir}/qat", max_steps=args.max_steps, **common),
            train_dataset=data["train"],
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=[qat],
        )
    trainer.train()
    quantized_dir = f"{args.output_dir}/qat/quantized"
    qat_quantized = AutoModelForCausalLM.from_pretrained(quantized_dir)  # stock loading of the QAT result

    # Baseline: the same fine-tune in full precision, then post-training quantization with the same torchao config.
    fp_model = copy.deepcopy(base)
    Trainer(
        model=fp_model,
        args=TrainingArguments(output_dir=f"{args.output_dir}/fp", max_steps=args.max_steps, **common),
        train_dataset=data["train"],
        data_collator=collator,
    ).train()
    ptq = save_qat_model(
        copy.deepcopy(fp_model), f"{args.output_dir}/ptq", QATConfig(args.scheme, args.group_size), overwrite=True
    )

    val = data["validation"]
    print(f"\n| model ({args.scheme}, group {args.group_size}) | validation perplexity |\n|---|---|")
    for name, m in (
        ("full-precision fine-tune", fp_model),
        ("  + post-training quantization", ptq),
        ("QAT fine-tune, quantized" + (" (distilled)" if args.distill_from else ""), qat_quantized),
    ):
        print(f"| {name} | {perplexity(m, val, args.max_eval_blocks):.3f} |")
    print(f"\nwall time {time.time() - started:.0f} s; quantized QAT model in {quantized_dir}")


if __name__ == "__main__":
    main()
