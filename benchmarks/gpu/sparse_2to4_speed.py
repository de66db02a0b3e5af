"""2:4 semi-structured sparsity: speed of the sparse tensor cores against dense fp16, and unchanged logits.

1. A 10240 -> 3072 fp16 `nn.Linear` alone (PyTorch's published anchor: 1.38x on an A100 with 3072 input rows),
   pruned with `prune_(PruningConfig(pattern="2:4"))`, converted with `to_semi_structured_sparse_`, timed at
   1, 16, 64, 256 and 3072 input rows against the dense pruned weight.
2. A ~0.68B causal LM (Qwen2 layout from a config): one `Trainer` step (learning rate 0) with
   `PruningCallback(PruningConfig(pattern="2:4"))` prunes every Linear of the blocks, the model goes to fp16, a copy
   is converted with `to_semi_structured_sparse_`, and forward latency of both is timed, interleaved, at batch
   1, 16, 64, 256 x `--seq-len` tokens. Logits of the sparse model must equal the dense pruned model's to fp16
   tolerance (max |diff| <= 1e-2 x max |logit|). Goal: speedup >= 1.3x where the batch allows.

    python benchmarks/gpu/sparse_2to4_speed.py            # GPU (compute capability >= 8.0)
    python benchmarks/gpu/sparse_2to4_speed.py --smoke    # CPU: pruning + 2:4 compliance only, conversion skipped

Prints Markdown tables and writes JSON to --json and to $OUT/sparse_2to4_speed.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from common import (
    GPU_MODEL,
    SMOKE_MODEL,
    build_causal_lm,
    environment,
    has_cuda,
    interleaved_medians,
    markdown_table,
    num_parameters,
    skip,
    write_json,
)
from torch import nn

from hf_compress import PruningCallback, PruningConfig, prune_, sparsity_report, to_semi_structured_sparse_


def sparse_backend() -> str:
    if not has_cuda():
        return "none (no CUDA)"
    from torch.sparse import SparseSemiStructuredTensor

    if getattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", False):
        return "CUTLASS (forced)"
    available = getattr(torch.backends, "cusparselt", None)
    if available is not None and torch.backends.cusparselt.is_available():
        return f"cuSPARSELt {torch.backends.cusparselt.version()}"
    return "CUTLASS"


def bench_linear(rows_list: list[int], in_features: int, out_features: int, rounds: int, warmup: int, cuda: bool):
    torch.manual_seed(0)
    dense = nn.ModuleList([nn.Linear(in_features, out_features)])  # a numbered container: a "block" layer
    prune_(dense, PruningConfig(pattern="2:4"))
    compliant = sparsity_report(dense, pattern="2:4")["n_m_compliant"]
    results = []
    if not cuda:
        skip("2:4 linear speed needs a CUDA GPU with sparse tensor cores (compute capability >= 8.0)")
        return {"n_m_compliant": compliant, "rows": results}
    dense = dense.half().cuda().eval()
    sparse = copy.deepcopy(dense)
    to_semi_structured_sparse_(sparse)
    with torch.inference_mode():
        for rows in rows_list:
            x = torch.rand(rows, in_features, dtype=torch.float16, device="cuda")
            diff = (dense[0](x) - sparse[0](x)).abs().max().item()
            t = interleaved_medians(
                {"dense": lambda x=x: dense[0](x), "sparse": lambda x=x: sparse[0](x)}, rounds=rounds, warmup=warmup
            )
            results.append(
                {
                    "rows": rows,
                    "dense_ms": t["dense"] * 1e3,
                    "sparse_ms": t["sparse"] * 1e3,
                    "speedup": t["dense"] / t["sparse"],
                    "max_abs_diff": diff,
                }
            )
    return {"n_m_compliant": compliant, "rows": results}


def prune_with_callback(model, spec: dict, cuda: bool) -> dict:
    """One Trainer step at learning rate 0 with PruningCallback(pattern='2:4'): the masks the callback computes
    at step 0 and bakes in at the end of training, and nothing else changes."""
    from transformers import Trainer, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            ids = torch.arange(16) % spec["vocab_size"]
            return {"input_ids": ids, "labels": ids}

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=1,
            learning_rate=0.0,
            per_device_train_batch_size=1,
            report_to="none",
            save_strategy="no",
            use_cpu=not cuda,
            disable_tqdm=True,
        )
        callback = PruningCallback(PruningConfig(pattern="2:4"))
        Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[callback]).train()
    return sparsity_report(model, pattern="2:4")


def bench_model(spec: dict, batches: list[int], seq: int, rounds: int, warmup: int, cuda: bool) -> dict:
    device = "cuda" if cuda else "cpu"
    model = build_causal_lm(spec).to(device)
    report = prune_with_callback(model, spec, cuda)
    out = {
        "target_sparsity": report["target_sparsity"],
        "n_m_compliant": report["n_m_compliant"],
        "pruned_modules": len(report["modules"]),
        "batches": [],
    }
    if not cuda:
        try:
            to_semi_structured_sparse_(model)
        except RuntimeError as err:  # the library's own refusal without CUDA
            out["conversion_error"] = str(err)
        skip(f"to_semi_structured_sparse_ and the model speed need CUDA: {out.get('conversion_error')}")
        return out
    dense = model.half().eval()
    sparse = copy.deepcopy(dense)
    out["converted_modules"] = len(to_semi_structured_sparse_(sparse))
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b in batches:
            ids = torch.randint(0, spec["vocab_size"], (b, seq), generator=g).to(device)
            d_logits, s_logits = dense(input_ids=ids).logits.float(), sparse(input_ids=ids).logits.float()
            diff = (d_logits - s_logits).abs().max().item()
            scale = d_logits.abs().max().item()
            agree = (d_logits.argmax(-1) == s_logits.argmax(-1)).float().mean().item()
            del d_logits, s_logits
            t = interleaved_medians(
                {"dense": lambda ids=ids: dense(input_ids=ids), "sparse": lambda ids=ids: sparse(input_ids=ids)},
                rounds=rounds,
                warmup=warmup,
            )
            out["batches"].append(
                {
                    "batch": b,
                    "tokens": b * seq,
                    "dense_ms": t["dense"] * 1e3,
                    "sparse_ms": t["sparse"] * 1e3,
                    "speedup": t["dense"] / t["sparse"],
                    "max_abs_logit_diff": diff,
                    "max_abs_logit": scale,
                    "logits_equal_fp16_tol": diff <= 1e-2 * max(scale, 1.0),
                    "argmax_agreement": agree,
                }
            )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: pruning and compliance only")
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--linear-rows", default="1,16,64,256,3072")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence in the model benchmark")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = has_cuda()
    if not cuda and not args.smoke:
        parser.error("no CUDA device: run with --smoke on CPU")
    spec = SMOKE_MODEL if args.smoke else GPU_MODEL
    batches = [int(b) for b in args.batches.split(",")]
    seq = 16 if args.smoke else args.seq_len
    in_f, out_f = (256, 128) if args.smoke else (10240, 3072)
    env = environment()
    env["sparse_backend"] = sparse_backend()

    linear = bench_linear([int(r) for r in args.linear_rows.split(",")], in_f, out_f, args.rounds, args.warmup, cuda)
    model = bench_model(spec, batches, seq, args.rounds, args.warmup, cuda)

    print(f"# 2:4 sparse vs dense fp16: {env['device']}, backend {env['sparse_backend']}, medians of {args.rounds}")
    print(f"\n## nn.Linear({in_f}, {out_f}) alone; 2:4 compliant after prune_: {linear['n_m_compliant']}")
    if linear["rows"]:
        print(
            markdown_table(
                [
                    "input rows",
                    "dense (ms)",
                    "2:4 sparse (ms)",
                    "speedup (anchor 1.38x at 3072 on A100)",
                    "max |diff|",
                ],
                [[r["rows"], r["dense_ms"], r["sparse_ms"], r["speedup"], r["max_abs_diff"]] for r in linear["rows"]],
            )
        )
    print(
        f"\n## causal LM, {num_parameters(spec) / 1e6:.1f}M params, seq {seq}: PruningCallback(pattern='2:4') pruned "
        f"{model['pruned_modules']} modules to sparsity {model['target_sparsity']:.3f}, 2:4 compliant "
        f"{model['n_m_compliant']}"
    )
    if model["batches"]:
        print(
            markdown_table(
                ["batch", "dense (ms)", "2:4 sparse (ms)", "speedup (goal >= 1.3)", "max |logit diff|", "equal"],
                [
                    [
                        r["batch"],
                        r["dense_ms"],
                        r["sparse_ms"],
                        r["speedup"],
                        r["max_abs_logit_diff"],
                        r["logits_equal_fp16_tol"],
                    ]
                    for r in model["batches"]
                ],
            )
        )
    payload = {
        "benchmark": "sparse_2to4_speed",
        "smoke": args.smoke,
        "env": env,
        "seq_len": seq,
        "rounds": args.rounds,
        "linear": linear,
        "model": model,
    }
    for p in write_json("sparse_2to4_speed", payload, args.json):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
