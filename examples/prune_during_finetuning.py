"""Prune a causal LM while fine-tuning it with an ordinary Trainer: add one callback, change nothing else.

# a hub model on your own text file (gradual cubic schedule to 50%, Zhu & Gupta 2017)
python examples/prune_during_finetuning.py --model gpt2 --train-file train.txt --sparsity 0.5
# 2:4 semi-structured with Wanda scores
python examples/prune_during_finetuning.py --pattern 2:4 --method wanda
# runs here, offline: a tiny GPT-2 from a config, bytes of WikiText-2 from ../shared/data
python examples/prune_during_finetuning.py --offline
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from hf_compress import PruningCallback, PruningConfig, sparsity_report
from hf_compress.utils.threads import configure_threads

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


class Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, block: int):
        n = ids.numel() // block
        self.blocks = ids[: n * block].view(n, block)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i].clone()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--train-file", default=str(WIKITEXT / "train.txt"))
    parser.add_argument("--output-dir", default="pruned-model")
    parser.add_argument("--method", default="magnitude", choices=["magnitude", "wanda"])
    parser.add_argument("--pattern", default="unstructured", help="'unstructured' or 'N:M' such as '2:4'")
    parser.add_argument("--sparsity", type=float, default=None)
    parser.add_argument("--schedule", default="cubic", choices=["oneshot", "linear", "cubic"])
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--offline", action="store_true", help="tiny GPT-2 from a config, byte-level data")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 on small or busy machines, see hf_compress.utils.threads)",
    )
    opts = parser.parse_args()
    configure_threads(opts.num_threads)

    text = Path(opts.train_file).read_text(encoding="utf-8")
    if opts.offline:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=256, n_positions=128, n_embd=128, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None
            )
        )
        ids = torch.frombuffer(bytearray(text[:2_000_000].encode()), dtype=torch.uint8).long()
        opts.block_size, opts.max_steps = 128, min(opts.max_steps, 60)
    else:
        tokenizer = AutoTokenizer.from_pretrained(opts.model)
        model = AutoModelForCausalLM.from_pretrained(opts.model)
        ids = torch.tensor(tokenizer(text)["input_ids"])
    train = Blocks(ids, opts.block_size)

    config = PruningConfig(
        method=opts.method,
        sparsity=opts.sparsity,
        pattern=opts.pattern,
        schedule=opts.schedule,
        start_step=0,
        end_step=opts.max_steps * 3 // 4,  # leave the last quarter for recovery at the final sparsity
        frequency=max(1, opts.max_steps // 20),
    )
    calibration = [{"input_ids": torch.stack([train[i]["input_ids"] for i in range(b, b + 4)])} for b in (0, 4)]
    args = TrainingArguments(
        output_dir=opts.output_dir,
        max_steps=opts.max_steps,
        per_device_train_batch_size=8,
        learning_rate=5e-4,
        logging_steps=max(1, opts.max_steps // 10),
        save_steps=max(1, opts.max_steps // 2),
        report_to="none",
        use_cpu=opts.offline,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        callbacks=[PruningCallback(config, calibration_data=calibration if opts.method == "wanda" else None)],
    )
    trainer.train()
    trainer.save_model()  # a plain transformers checkpoint: from_pretrained loads the zeros, no hf_compress needed
    report = sparsity_report(model, pattern=opts.pattern if opts.pattern != "unstructured" else None)
    print(
        f"sparsity of the pruned layers: {report['target_sparsity']:.3f} "
        f"(layers {report['min_layer_sparsity']:.3f}..{report['max_layer_sparsity']:.3f}), "
        f"whole model {report['sparsity']:.3f}, N:M compliant: {report['n_m_compliant']}; saved to {opts.output_dir}"
    )


if __name__ == "__main__":
    main()
