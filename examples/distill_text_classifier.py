"""Distil a fine-tuned BERT phishing-URL classifier into a smaller student, as an ordinary Trainer script.

The reference pipeline: fine-tune a teacher, create a student with fewer layers and heads, train it with
`DistillationTrainer` (soft targets at temperature 2, alpha 0.5: KL divergence times T² plus cross-entropy), and
compare accuracy / precision / recall / F1 on held-out data.

Online (hub names are the defaults):
    python examples/distill_text_classifier.py
    python examples/distill_text_classifier.py --teacher google-bert/bert-base-uncased \
        --dataset shawhin/phishing-site-classification --student-layers 4 --student-heads 8

Offline, fully local (embedded phishing URL sample, a tokenizer trained on it, a small BERT teacher trained on it):
    python examples/distill_text_classifier.py --offline
A local model directory also works: --teacher ./my-bert-phishing --teacher-is-finetuned
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

from hf_compress import DistillationConfig, DistillationTrainer, create_student, make_compute_metrics
from hf_compress.data import load_phishing_dataset, train_url_tokenizer
from hf_compress.utils import count_parameters
from hf_compress.utils.threads import configure_threads


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="google-bert/bert-base-uncased", help="teacher model name or local path")
    p.add_argument("--teacher-is-finetuned", action="store_true", help="skip fine-tuning the teacher")
    p.add_argument("--dataset", default="shawhin/phishing-site-classification", help="hub dataset (text, labels)")
    p.add_argument("--offline", action="store_true", help="embedded data, local tokenizer and a small teacher")
    p.add_argument("--output-dir", default="outputs/distill_text_classifier")
    p.add_argument("--student-layers", type=int, default=None, help="default: half the teacher's layers")
    p.add_argument("--student-heads", type=int, default=None, help="default: 2/3 of the teacher's heads")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--teacher-epochs", type=float, default=2.0)
    p.add_argument("--student-epochs", type=float, default=2.0)
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


def load_data_and_teacher(args):
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

    data = load_dataset(args.dataset)  # splits train / validation / test with columns text, labels
    if "labels" in data["train"].column_names:
        data = data.rename_column("labels", "label")
    if "test" not in data:
        split = data["train"].train_test_split(test_size=0.15, seed=args.seed, stratify_by_column="label")
        data["train"], data["test"] = split["train"], split["test"]
    if "validation" not in data:
        data["validation"] = data["test"]
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(
        args.teacher,
        num_labels=2,
        id2label={0: "legitimate", 1: "phishing"},
        label2id={"legitimate": 0, "phishing": 1},
    )
    return data, tokenizer, teacher


def main():
    args = parse_args()
    configure_threads(args.num_threads)
    started = time.time()
    lr = args.learning_rate or (5e-4 if args.offline else 2e-5)
    data, tokenizer, teacher = load_data_and_teacher(args)
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True)
    collator = DataCollatorWithPadding(tokenizer)
    compute_metrics = make_compute_metrics("classification")
    common = dict(
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        learning_rate=lr,
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=50,
        report_to="none",
        seed=args.seed,
    )

    if not args.teacher_is_finetuned:
        teacher_args = TrainingArguments(
            output_dir=f"{args.output_dir}/teacher", num_train_epochs=args.teacher_epochs, **common
        )
        Trainer(
            model=teacher,
            args=teacher_args,
            train_dataset=data["train"],
            eval_dataset=data["validation"],
            data_collator=collator,
            compute_metrics=compute_metrics,
            processing_class=tokenizer,
        ).train()

    n_layers = teacher.config.num_hidden_layers
    n_heads = teacher.config.num_attention_heads
    student = create_student(
        teacher,
        num_layers=args.student_layers or max(1, n_layers // 2),
        num_heads=args.student_heads or max(1, (2 * n_heads) // 3),
    )
    student_args = DistillationConfig(
        output_dir=f"{args.output_dir}/student",
        num_train_epochs=args.student_epochs,
        temperature=args.temperature,
        alpha=args.alpha,
        **common,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=student_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator,
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(f"{args.output_dir}/student/final")

    # Held-out comparison: the same metric function for both models.
    rows = []
    for name, model in (("teacher", teacher), ("student", student)):
        evaluator = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=f"{args.output_dir}/eval", report_to="none", per_device_eval_batch_size=128
            ),
            data_collator=collator,
            compute_metrics=compute_metrics,
        )
        metrics = evaluator.evaluate(data["test"], metric_key_prefix="test")
        params, _ = count_parameters(model)
        rows.append((name, params, model.get_memory_footprint() / 1e6, metrics))
    print("\n| model | parameters | MB | accuracy | precision | recall | F1 |")
    print("|---|---|---|---|---|---|---|")
    for name, params, mb, m in rows:
        print(
            f"| {name} | {params / 1e6:.2f}M | {mb:.1f} | {m['test_accuracy']:.4f} | {m['test_precision']:.4f} | "
            f"{m['test_recall']:.4f} | {m['test_f1']:.4f} |"
        )
    print(f"\nwall time {time.time() - started:.0f} s; student saved to {args.output_dir}/student/final")


if __name__ == "__main__":
    main()
