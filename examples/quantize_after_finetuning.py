"""Fine-tune a text classifier, then quantize it in the same run and evaluate both, as an ordinary Trainer script.

The reference pipeline fine-tunes BERT on phishing URLs and, as a separate step afterwards, reloads it in 4-bit with
`BitsAndBytesConfig` (NF4, double quantization, bfloat16 compute) without evaluating it. Here one callback does it
at the end of training: `PostTrainingQuantizationCallback` quantizes a copy of the trained model, evaluates it with
the trainer's `compute_metrics` next to the full-precision model, saves it to `<output-dir>/ptq_<method>` beside
the full-precision model, and logs memory footprint and bytes on disk of both.

Methods: nf4, fp4, int8 (bitsandbytes LLM.int8), torchao-int8, torchao-int4. bitsandbytes 4/8-bit also run on CPU.

Online (hub names are the defaults):
    python examples/quantize_after_finetuning.py
    python examples/quantize_after_finetuning.py --method int8 --model distilbert/distilbert-base-uncased

Offline, fully local (embedded phishing URL sample, a tokenizer trained on it, a small BERT from a config):
    python examples/quantize_after_finetuning.py --offline
    python examples/quantize_after_finetuning.py --offline --method torchao-int4
Quantizing an already fine-tuned checkpoint without training: `hf_compress.quantize_model(path, "nf4", output_dir=...)`.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_compress import PostTrainingQuantizationCallback, make_compute_metrics
from hf_compress.data import load_phishing_dataset, train_url_tokenizer
from hf_compress.utils.threads import configure_threads


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="google-bert/bert-base-uncased", help="model name or local path")
    p.add_argument("--dataset", default="shawhin/phishing-site-classification", help="hub dataset (text, labels)")
    p.add_argument("--offline", action="store_true", help="embedded data, local tokenizer and a small BERT")
    p.add_argument("--output-dir", default="outputs/quantize_after_finetuning")
    p.add_argument("--method", default="nf4", help="nf4, fp4, int8, torchao-int8 or torchao-int4")
    p.add_argument("--no-double-quant", action="store_true", help="bitsandbytes 4-bit without nested quantization")
    p.add_argument("--compute-dtype", default="bfloat16", help="bitsandbytes 4-bit compute dtype")
    p.add_argument("--group-size", type=int, default=32, help="torchao-int4 group size")
    p.add_argument("--epochs", type=float, default=None, help="default: 3 online, 2 offline")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=None, help="default: 2e-5 online, 5e-4 offline")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-examples", type=int, default=None, help="use a class-balanced sample of the data")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 on small or busy machines, see hf_compress.utils.threads)",
    )
    return p.parse_args()


def load_data_and_model(args):
    if args.offline:
        data = load_phishing_dataset(seed=args.seed, max_examples=args.max_examples)
        tokenizer = train_url_tokenizer(data["train"]["text"], vocab_size=1024, model_max_length=args.max_length)
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=512,
            max_position_embeddings=args.max_length,
            num_labels=2,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(args.seed)
        return data, tokenizer, BertForSequenceClassification(config)
    from datasets import load_dataset

    data = load_dataset(args.dataset)
    if "labels" in data["train"].column_names:
        data = data.rename_column("labels", "label")
    if "validation" not in data:
        split = data["train"].train_test_split(test_size=0.15, seed=args.seed, stratify_by_column="label")
        data["train"], data["validation"] = split["train"], split["test"]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=2, id2label={0: "legitimate", 1: "phishing"}, label2id={"legitimate": 0, "phishing": 1}
    )
    return data, tokenizer, model


def main():
    args = parse_args()
    configure_threads(args.num_threads)
    started = time.time()
    data, tokenizer, model = load_data_and_model(args)
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs or (2 if args.offline else 3),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        learning_rate=args.learning_rate or (5e-4 if args.offline else 2e-5),
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=50,
        report_to="none",
        seed=args.seed,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=make_compute_metrics("classification"),
        processing_class=tokenizer,
    )
    # The one addition to an ordinary fine-tuning script:
    ptq = PostTrainingQuantizationCallback(
        args.method,
        trainer=trainer,
        double_quant=not args.no_double_quant,
        compute_dtype=args.compute_dtype,
        group_size=args.group_size,
    )
    trainer.add_callback(ptq)
    trainer.train()

    m, p = ptq.metrics, ptq.prefix
    print("\n| model | accuracy | F1 | memory MB | weights on disk MB |\n|---|---|---|---|---|")
    print(
        f"| full precision | {m['eval_accuracy']:.4f} | {m['eval_f1']:.4f} | "
        f"{m['full_precision_memory_footprint_bytes'] / 1e6:.2f} | {m['full_precision_disk_bytes'] / 1e6:.2f} |"
    )
    print(
        f"| {args.method} | {m[f'{p}_accuracy']:.4f} | {m[f'{p}_f1']:.4f} | "
        f"{m[f'{p}_memory_footprint_bytes'] / 1e6:.2f} | {m[f'{p}_disk_bytes'] / 1e6:.2f} |"
    )
    print(f"\nwall time {time.time() - started:.0f} s; models in {args.output_dir} and {ptq.quantized_model_dir}")


if __name__ == "__main__":
    main()
