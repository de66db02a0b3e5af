"""QLoRA fine-tuning of a causal LM on WikiText-2 with an ordinary Trainer, then a merge that keeps the accuracy.

`load_qlora_model` gives a 4-bit NF4 base (double quantization, bf16 compute) with LoRA adapters on every Linear
layer of the blocks; `merge_qlora` merges the adapter into the dequantized base, saves it, optionally re-quantizes
it, and reports perplexity of adapter-on-4-bit-base vs merged (vs re-quantized).

Online (hub model and dataset; run with `accelerate launch` for DDP, each rank loads on its own GPU):
    python examples/qlora_finetune.py --model Qwen/Qwen2.5-0.5B --bf16
    accelerate launch examples/qlora_finetune.py --model meta-llama/Llama-3.2-1B --bf16

Offline, fully local (WikiText-2 from ../shared/data, a byte-level BPE tokenizer trained on it, a tiny Llama built
from a config and pre-trained for a few steps in full precision, so the 4-bit base knows a little):
    python examples/qlora_finetune.py --offline
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments

from hf_compress import load_qlora_model, merge_qlora
from hf_compress.utils.threads import configure_threads

LOCAL_WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B", help="base model name or local path")
    p.add_argument("--offline", action="store_true", help="local WikiText-2, local tokenizer, tiny Llama")
    p.add_argument("--data-dir", default=str(LOCAL_WIKITEXT), help="folder with train.txt / valid.txt")
    p.add_argument("--output-dir", default="outputs/qlora_finetune")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=None, help="default: 2 * r")
    p.add_argument("--load-in-8bit", action="store_true", help="8-bit base instead of 4-bit NF4")
    p.add_argument("--loftq", action="store_true", help="LoftQ initialisation of the adapters")
    p.add_argument("--block-size", type=int, default=None, help="tokens per example (default 512 online, 64 offline)")
    p.add_argument("--max-steps", type=int, default=None, help="default 500 online, 100 offline")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--max-train-chars", type=int, default=None, help="truncate the training text (offline: 400k)")
    p.add_argument("--requantize", choices=["nf4", "int8"], default="nf4")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 on small or busy machines, see hf_compress.utils.threads)",
    )
    return p.parse_args()


def read_text(data_dir: str, split: str, max_chars: int | None) -> str:
    text = (Path(data_dir) / f"{split}.txt").read_text(encoding="utf-8")
    return text[:max_chars] if max_chars else text


def load_text(args):
    if args.offline or Path(args.data_dir, "train.txt").exists():
        return {
            s: read_text(args.data_dir, s, args.max_train_chars if s == "train" else 100_000)
            for s in ("train", "valid")
        }
    from datasets import load_dataset

    data = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1")
    return {"train": "\n".join(data["train"]["text"]), "valid": "\n".join(data["validation"]["text"])}


def blocks(tokenizer, text: str, block_size: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.tensor(tokenizer(text)["input_ids"])
    n = len(ids) // block_size
    return [{"input_ids": chunk, "labels": chunk.clone()} for chunk in ids[: n * block_size].view(n, block_size)]


def offline_base(args, train_text: str) -> str:
    """Train a byte-level BPE tokenizer and pre-train a tiny Llama on the local text; return its folder."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(args.output_dir) / "tiny-base"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([train_text], vocab_size=1024, special_tokens=["<pad>", "<eos>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=args.block_size,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    pretrain = TrainingArguments(
        output_dir=str(folder / "run"),
        max_steps=60,  # deliberately short: an under-trained base leaves the adapters something to learn
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        warmup_steps=20,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=True,
    )
    Trainer(model=model, args=pretrain, train_dataset=blocks(tokenizer, train_text, args.block_size)).train()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def perplexity(trainer: Trainer, dataset) -> float:
    return math.exp(trainer.evaluate(dataset)["eval_loss"])


def main():
    args = parse_args()
    configure_threads(args.num_threads)
    started = time.time()
    if args.offline:
        args.block_size = args.block_size or 64
        args.max_steps = args.max_steps or 100
        args.max_train_chars = args.max_train_chars or 400_000
        args.learning_rate = max(args.learning_rate, 5e-3)  # tiny model, few steps
    args.block_size = args.block_size or 512
    args.max_steps = args.max_steps or 500
    text = load_text(args)
    model_path = offline_base(args, text["train"]) if args.offline else args.model
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, valid = blocks(tokenizer, text["train"], args.block_size), blocks(tokenizer, text["valid"], args.block_size)

    model = load_qlora_model(
        model_path,
        task="causal-lm",
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        load_in_8bit=args.load_in_8bit,
        loftq=args.loftq,
    )
    model.print_trainable_parameters()
    training_args = TrainingArguments(
        output_dir=f"{args.output_dir}/run",
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to="none",
        bf16=args.bf16,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=valid)
    ppl_before = perplexity(trainer, valid)
    trainer.train()
    ppl_after = perplexity(trainer, valid)
    if not trainer.is_world_process_zero():
        return
    model.save_pretrained(f"{args.output_dir}/adapter")
    tokenizer.save_pretrained(f"{args.output_dir}/adapter")

    result = merge_qlora(
        model,
        f"{args.output_dir}/merged",
        requantize=args.requantize,
        eval_dataset=valid,
        eval_batch_size=args.batch_size,
        overwrite=True,
    )
    print(f"\nvalidation perplexity of the 4-bit base + fresh adapter: {ppl_before:.2f}; after QLoRA: {ppl_after:.2f}")
    print("\n| model | eval loss | perplexity |")
    print("|---|---|---|")
    for name, metrics in result.metrics.items():
        print(f"| {name} | {metrics['eval_loss']:.4f} | {metrics['eval_perplexity']:.2f} |")
    print(f"\nmerged model: {result.output_dir}; {args.requantize} copy: {result.requantized_output_dir}")
    print(f"wall time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # under `accelerate launch`
        torch.distributed.destroy_process_group()  # a live gloo group can abort the exit (pytorch/pytorch#190489)
