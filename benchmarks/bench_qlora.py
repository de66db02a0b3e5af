"""QLoRA vs 16-bit LoRA on the same architecture, measured side by side on this machine.

Prints: the trainable parameter share, the memory footprint (`get_memory_footprint`) of the 4-bit NF4 model against
the full-precision (fp32) and bf16 models, and the training step time (forward + backward + AdamW step) of QLoRA
(NF4 base, bf16 compute) vs 16-bit LoRA (bf16 base), both through `load_qlora_model` with the same LoRA targets and
gradient checkpointing. Step times are interleaved (A, B, A, B, ...) over several repeats and reported as medians,
so load from other processes hits both variants alike.

    python benchmarks/bench_qlora.py                  # Llama-shaped, hidden 256, 4 layers, on CPU
    python benchmarks/bench_qlora.py --hidden 512 --layers 8 --repeats 7

On a CPU shared with other jobs, set OMP_NUM_THREADS=1: with more threads than free cores, OpenMP oversubscription
made every step about 10x slower here and drowned the difference between the variants in noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_compress import load_qlora_model


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    return p.parse_args()


def build_base(args, folder: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        intermediate_size=int(args.hidden * 2.6875) // 64 * 64,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return model


def _bnb(load_in_4bit: bool = False, load_in_8bit: bool = False):
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def step_fn(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main():
    args = parse_args()
    gc = not args.no_gradient_checkpointing
    with tempfile.TemporaryDirectory() as folder:
        fp32 = build_base(args, folder)
        fp32_bytes = fp32.get_memory_footprint()
        n_params = sum(p.numel() for p in fp32.parameters())
        del fp32
        bf16_bytes = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).get_memory_footprint()

        common = dict(lora_r=args.lora_r, lora_dropout=0.0, gradient_checkpointing=gc)
        variants = {
            "QLoRA (NF4 + double quant, bf16 compute)": load_qlora_model(folder, **common),
            "16-bit LoRA (bf16 base)": load_qlora_model(folder, load_in_4bit=False, **common),
        }
        qlora = next(iter(variants.values()))
        footprints = {"fp32": fp32_bytes, "bf16": bf16_bytes}
        for name, kwargs in (
            ("int8 (LLM.int8), rest bf16", dict(load_in_8bit=True)),
            ("NF4 + double quant, rest fp32", dict(load_in_4bit=True, dtype=torch.float32)),
            ("NF4 + double quant, rest bf16", dict(load_in_4bit=True)),
        ):
            dtype = kwargs.pop("dtype", torch.bfloat16)
            quantized = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, quantization_config=_bnb(**kwargs), device_map={"": "cpu"}
            )
            footprints[name] = quantized.get_memory_footprint()
            del quantized
        # what QLoRA trains: prepare_model_for_kbit_training upcasts the non-quantized parts to fp32, plus adapters
        footprints["QLoRA training model (NF4 + fp32 rest + adapters)"] = qlora.get_memory_footprint()

        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        steps = {name: step_fn(model, batch) for name, model in variants.items()}
        for step in steps.values():  # warm-up: first-call repacking of 4-bit weights, allocator, optimizer state
            step()
        times: dict[str, list[float]] = {name: [] for name in variants}
        load_before = os.getloadavg()[0]
        for _ in range(args.repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[name].append((time.perf_counter() - start) / args.steps)
        load_after = os.getloadavg()[0]

    print(
        f"\nLlama-shaped model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
        f"{n_params / 1e6:.2f}M parameters; LoRA r={args.lora_r} on all block Linear layers; "
        f"gradient checkpointing {'on' if gc else 'off'}; batch {args.batch_size} x {args.seq_len} tokens"
    )
    trainable, total = qlora.get_nb_trainable_parameters()
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    print("\n| weights | memory footprint | vs fp32 |")
    print("|---|---|---|")
    for name, size in footprints.items():
        print(f"| {name} | {size / 2**20:.2f} MiB | {size / fp32_bytes:.3f}x |")
    print(f"\n| variant | median step time (s) | min | max | ratio |  (torch threads {torch.get_num_threads()})")
    print("|---|---|---|---|---|")
    reference = statistics.median(times["16-bit LoRA (bf16 base)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.4f} | {min(values):.4f} | {max(values):.4f} | {median / reference:.2f}x |")
    print(
        f"\n{args.repeats} interleaved rounds of {args.steps} steps each; 1-min load average "
        f"{load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
