"""Distil a 4-bit teacher into a QLoRA student (4-bit base + LoRA adapters) with `DistillationTrainer`.

Both models fit in memory at 4 bits: the teacher is loaded in NF4 through `teacher_model_init_kwargs` (frozen,
`eval()`, never wrapped in DDP), the student is `load_qlora_model(...)` and only its adapters train. The loss mixes
the KL divergence to the teacher's softened next-token distribution (temperature T, weight alpha) with the usual
language-modelling loss. Afterwards the adapter is merged into the dequantized student base with `merge_qlora`.

Online (hub models sharing one tokenizer; add `--bf16` on a GPU, or run under `accelerate launch`):
    python examples/qlora_distill.py --teacher Qwen/Qwen2.5-1.5B --student Qwen/Qwen2.5-0.5B --bf16

Offline, fully local (WikiText-2 from ../shared/data, a byte-level BPE tokenizer trained on it, a 4-layer teacher
and a 2-layer student built from configs and pre-trained briefly in full precision, the teacher for longer):
    python examples/qlora_distill.py --offline
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, BitsAndBytesConfig, Trainer, TrainingArguments

from hf_compress import DistillationConfig, DistillationTrainer, compute_perplexity, load_qlora_model, merge_qlora
from hf_compress.utils.threads import configure_threads

LOCAL_WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="Qwen/Qwen2.5-1.5B", help="teacher name or path (loaded in 4-bit)")
    p.add_argument("--student", default="Qwen/Qwen2.5-0.5B", help="student base name or path (QLoRA)")
    p.add_argument("--offline", action="store_true", help="local WikiText-2, local tokenizer, tiny Llamas")
    p.add_argument("--data-dir", default=str(LOCAL_WIKITEXT), help="folder with train.txt / valid.txt")
    p.add_argument("--output-dir", default="outputs/qlora_distill")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation loss")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--block-size", type=int, default=None, help="tokens per example (default 512 online, 64 offline)")
    p.add_argument("--max-steps", type=int, default=None, help="default 500 online, 60 offline")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=None, help="default 2e-4 online, 2e-3 offline")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 on small or busy machines, see hf_compress.utils.threads)",
    )
    return p.parse_args()


def load_text(args) -> dict[str, str]:
    if args.offline or Path(args.data_dir, "train.txt").exists():
        limits = {"train": 400_000 if args.offline else None, "valid": 100_000}
        return {s: Path(args.data_dir, f"{s}.txt").read_text(encoding="utf-8")[: limits[s]] for s in limits}
    from datasets import load_dataset

    data = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1")
    return {"train": "\n".join(data["train"]["text"]), "valid": "\n".join(data["validation"]["text"])}


def blocks(tokenizer, text: str, block_size: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.tensor(tokenizer(text)["input_ids"])
    n = len(ids) // block_size
    return [{"input_ids": chunk, "labels": chunk.clone()} for chunk in ids[: n * block_size].view(n, block_size)]


def offline_models(args, train_text: str) -> tuple[str, str]:
    """A shared tokenizer, a 4-layer teacher and a 2-layer student pre-trained on local text; their folders."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([train_text], vocab_size=1024, special_tokens=["<pad>", "<eos>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>")
    data = blocks(tokenizer, train_text, args.block_size)
    folders = []
    for name, hidden, layers, steps in (("teacher", 128, 4, 300), ("student", 64, 2, 60)):
        torch.manual_seed(args.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=args.block_size,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        model = LlamaForCausalLM(config)
        folder = Path(args.output_dir) / f"tiny-{name}"
        pretrain = TrainingArguments(
            output_dir=str(folder / "run"),
            max_steps=steps,
            per_device_train_batch_size=16,
            learning_rate=3e-3,
            warmup_steps=10,
            logging_steps=50,
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            use_cpu=True,
        )
        Trainer(model=model, args=pretrain, train_dataset=data).train()
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    return folders[0], folders[1]


def main():
    args = parse_args()
    configure_threads(args.num_threads)
    started = time.time()
    args.block_size = args.block_size or (64 if args.offline else 512)
    args.max_steps = args.max_steps or (60 if args.offline else 500)
    lr = args.learning_rate or (2e-3 if args.offline else 2e-4)
    text = load_text(args)
    teacher_path, student_path = offline_models(args, text["train"]) if args.offline else (args.teacher, args.student)
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    train, valid = blocks(tokenizer, text["train"], args.block_size), blocks(tokenizer, text["valid"], args.block_size)

    student = load_qlora_model(student_path, task="causal-lm", lora_r=args.lora_r)
    student.print_trainable_parameters()
    use_cpu = not torch.cuda.is_available()
    training_args = DistillationConfig(
        output_dir=f"{args.output_dir}/run",
        temperature=args.temperature,
        alpha=args.alpha,
        # the teacher is loaded by the trainer, in 4-bit NF4, on this process's device
        teacher_model_init_kwargs={
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
            "device_map": {"": "cpu"} if use_cpu else None,
        },
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to="none",
        bf16=args.bf16,
        seed=args.seed,
        use_cpu=use_cpu,
    )
    if not use_cpu:
        from accelerate import PartialState

        training_args.teacher_model_init_kwargs["device_map"] = {"": PartialState().local_process_index}
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=valid,
        processing_class=tokenizer,
    )
    eval_batches = list(torch.utils.data.DataLoader(valid, batch_size=args.batch_size))

    def ppl(model) -> float:
        was_training = model.training
        with torch.no_grad():
            value = compute_perplexity(model, eval_batches)
        model.train(was_training)
        return value

    teacher_ppl, before = ppl(trainer.teacher_model), ppl(student)
    trainer.train()
    after = ppl(student)
    if not trainer.is_world_process_zero():
        return
    result = merge_qlora(student, f"{args.output_dir}/merged", eval_dataset=valid, overwrite=True)
    print("\n| model | validation perplexity |")
    print("|---|---|")
    print(f"| teacher (4-bit NF4) | {teacher_ppl:.2f} |")
    print(f"| QLoRA student before distillation | {before:.2f} |")
    print(f"| QLoRA student after distillation | {after:.2f} |")
    print(f"| merged student (dequantized base + adapter) | {result.metrics['merged']['eval_perplexity']:.2f} |")
    print(f"\nmerged student: {result.output_dir}; wall time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # under `accelerate launch`
        torch.distributed.destroy_process_group()  # a live gloo group can abort the exit (pytorch/pytorch#190489)
