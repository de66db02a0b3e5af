"""Compressed models that serve faster (issue 13): 2:4 sparse prefill and 4-bit batch-1 decoding against dense.

Everything runs side by side in one process on one GPU; timings are medians of interleaved rounds (the order of the
variants alternates each round), CUDA synchronized around each timed sample. Sections, most important first:

`--part synthetic` (a Llama with 7B-like widths built from a config: hidden 4096, intermediate 14336, 32 heads / 8
KV heads, `--layers` 8, 32k vocabulary; random weights pruned 2:4 with `prune_`):
  b. prefill (fp16, `logits_to_keep=1`) at 1x2048, 2x2048 and 4x2048 tokens: dense eager, dense in CUDA graphs,
     2:4 eager (`to_semi_structured_sparse_`'s old path), 2:4 with `accelerate_sparse_inference_` (measured policy,
     CUDA graphs); last-token logits against the dense pruned model. Goal >= 1.25x over the best dense.
  c. batch-1 greedy decoding (bf16, 32-token prompt, 64 new tokens, `StaticCacheDecoder`): bf16 eager, bf16 in
     CUDA graphs, int4 (`quantize_int4_for_decoding_`, torchao tinygemm), bitsandbytes NF4 and LLM.int8 (graphs
     where they capture), 2:4 bf16, 2:4 + fp8. Goal: int4 >= 1.5x bf16 tokens/s.
  d. combined 2:4 + fp8 (torchao CUTLASS sm90 kernel) and dense fp8 at prefill, bf16 (the fp8 kernels' dtype).
  a. one linear alone, 4096x14336, 14336x4096, 4096x4096 (out x in), fp16, 1 .. 16,384 rows: dense eager, dense
     graph, 2:4 eager, 2:4 graph.
  f. `torch.compile(mode="reduce-overhead")` of the 2:4 model at 1x2048 tokens against the hand-captured graphs
     (compile time included in the record), if the budget allows.
`--part smollm2` (SmolLM2-135M from `smollm2_folder()`): 2:4-pruned bf16 prefill (dense eager / graph / 2:4 graph) with
WikiText-2 perplexity of the dense pruned model and of the 2:4 inference path (same weights: must be equal), then
batch-1 decoding of bf16 vs the `quantize_model(..., "torchao-int4-cuda")` export (saved and reloaded) vs NF4 / int8.

    python benchmarks/gpu/serve_fast.py --part synthetic --budget-s 270     # GPU, ~4.5 min
    python benchmarks/gpu/serve_fast.py --part smollm2 --budget-s 90        # GPU, ~1.5 min
    python benchmarks/gpu/serve_fast.py --smoke                             # CPU, tiny model, < 60 s

JSON goes to $OUT/serve_fast_<part>.json (default benchmarks/gpu/results/) after every measurement, so a killed run
keeps what it measured; a Markdown summary is printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from common import environment, has_cuda, markdown_table, write_json
from torch import nn

from hf_compress import (
    CUDAGraphRunner,
    PruningConfig,
    SparseInferenceConfig,
    StaticCacheDecoder,
    accelerate_sparse_inference_,
    plan_sparse_inference,
    prune_,
    quantize_int4_for_decoding_,
    to_semi_structured_sparse_,
)
from hf_compress.quantization.ptq import default_skip_modules

SYNTHETIC = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
)
SMOKE = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
LINEAR_SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096)]  # (out, in): MLP up/gate, down, attention q/o


class Bench:
    """Budget, device and incremental JSON output shared by the sections."""

    def __init__(self, args):
        self.args = args
        self.cuda = has_cuda()
        self.device = "cuda" if self.cuda else "cpu"
        self.start = time.monotonic()
        self.graph_backend = "cuda" if self.cuda else "emulate"
        self.payload = {
            "benchmark": "serve_fast",
            "part": args.part,
            "smoke": args.smoke,
            "budget_s": args.budget_s,
            "env": environment(),
            "sections": {},
        }
        self.name = f"serve_fast_{args.part}"
        self.path = None if os.environ.get("OUT") else str(Path("benchmarks/gpu/results") / f"{self.name}.json")

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def section(self, name: str) -> dict:
        return self.payload["sections"].setdefault(name, {})

    def save(self) -> None:
        self.payload["elapsed_s"] = time.monotonic() - self.start
        write_json(self.name, self.payload, self.path)

    def skip(self, section: str, why: str) -> None:
        print(f"SKIPPED {section}: {why}")
        self.section(section)["skipped"] = why
        self.save()


def guarded(bench: Bench, name: str, fn, *args) -> None:
    """Run one section; an exception is recorded in the JSON and the next section still runs."""
    try:
        fn(bench, *args)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        bench.section(name)["error"] = error_record(err)
        bench.section(name)["traceback"] = traceback.format_exc()[-2000:]
        bench.save()
        free()


def sync() -> None:
    if has_cuda():
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if has_cuda():
        torch.cuda.empty_cache()


def interleaved_ms(fns: dict, rounds: int, warmup: int = 1, reps: int = 1) -> dict[str, float]:
    """Median ms per call of each function; each sample is `reps` back-to-back calls (host cost included)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(warmup + rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                fns[name]()
            sync()
            if i >= warmup:
                samples[name].append((time.perf_counter() - t0) * 1e3 / reps)
    return {name: statistics.median(v) for name, v in samples.items()}


def build_llama(spec: dict, layers: int, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**spec, num_hidden_layers=layers, max_position_embeddings=16384, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def logits_agreement(reference: torch.Tensor, other: torch.Tensor) -> dict:
    reference, other = reference.float(), other.float()
    diff = (reference - other).abs().max().item()
    scale = reference.abs().max().item()
    return {
        "max_abs_diff": diff,
        "max_abs_logit": scale,
        "relative": diff / max(scale, 1e-6),
        "argmax_agreement": (reference.argmax(-1) == other.argmax(-1)).float().mean().item(),
    }


def error_record(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:400]


# ----------------------------------------------------------------------------------------------------------------
# prefill


def bench_prefill(bench: Bench, section: str, dense: nn.Module, variants: dict, token_shapes, vocab: int) -> None:
    """Time `variants` (name -> callable(ids)) at each (batch, seq) and compare last-token logits with dense eager."""
    rec = bench.section(section)
    rec.setdefault("rows", [])
    g = torch.Generator().manual_seed(0)
    for batch, seq in token_shapes:
        if bench.left() < 20:
            rec["rows"].append({"batch": batch, "seq": seq, "skipped": "budget"})
            bench.save()
            continue
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(bench.device)
        row = {"batch": batch, "seq": seq, "tokens": batch * seq, "ms": {}, "agreement": {}, "errors": {}}
        with torch.inference_mode():
            reference = dense(input_ids=ids, use_cache=False, logits_to_keep=1).logits
            fns = {}
            for name, fn in variants.items():
                try:
                    out = fn(ids).logits  # first call: captures where graphed
                    row["agreement"][name] = logits_agreement(reference[:, -1], out[:, -1])
                    fns[name] = lambda fn=fn, ids=ids: fn(ids)
                except Exception as err:  # noqa: BLE001 - a variant the stack cannot run is recorded, not fatal
                    row["errors"][name] = error_record(err)
                    traceback.print_exc(limit=3)
            row["ms"] = interleaved_ms(fns, rounds=bench.args.rounds, warmup=1)
        rec["rows"].append(row)
        bench.save()
        print(f"{section} {batch}x{seq}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row["ms"].items()))


def section_prefill_sparse(bench: Bench, master: nn.Module, token_shapes, vocab: int) -> None:
    """b. fp16 prefill: dense vs 2:4 (old eager path and accelerate_sparse_inference_)."""
    rec = bench.section("b_prefill_2to4_fp16")
    dense = copy.deepcopy(master).half().eval()
    dense_graph = CUDAGraphRunner(dense.forward, backend=bench.graph_backend)
    variants = {
        "dense eager": lambda ids: dense(input_ids=ids, use_cache=False, logits_to_keep=1),
        "dense graph": lambda ids: dense_graph(input_ids=ids, use_cache=False, logits_to_keep=1),
    }
    sparse_old = sparse_new = None
    if bench.cuda:
        sparse_old = copy.deepcopy(dense)
        rec["old_path_converted"] = len(to_semi_structured_sparse_(sparse_old))
        variants["2:4 eager (to_semi_structured_sparse_)"] = lambda ids: sparse_old(
            input_ids=ids, use_cache=False, logits_to_keep=1
        )
        sparse_new = copy.deepcopy(dense)
        t0 = time.perf_counter()
        config = SparseInferenceConfig(tokens=sorted({b * s for b, s in token_shapes}))
        plan = accelerate_sparse_inference_(sparse_new, config)
        rec["plan_s"] = time.perf_counter() - t0
        rec["plan"] = plan.to_dict()["layers"][:16]
        rec["plan_markdown"] = plan.to_markdown()
        rec["sparse_layers"] = len(plan.sparse_modules)
        rec["dense_layers"] = len(plan.dense_modules)
        print(plan.to_markdown())
        variants["2:4 graph (accelerate_sparse_inference_)"] = lambda ids: sparse_new(
            input_ids=ids, use_cache=False, logits_to_keep=1
        )
    else:
        try:
            accelerate_sparse_inference_(copy.deepcopy(dense), SparseInferenceConfig(policy="static"))
        except RuntimeError as err:
            rec["refusal_without_cuda"] = str(err)
        plan = plan_sparse_inference(dense, SparseInferenceConfig(policy="static", tokens=2048, min_features=64))
        rec["static_plan_markdown"] = plan.to_markdown()
    bench.save()
    bench_prefill(bench, "b_prefill_2to4_fp16", dense, variants, token_shapes, vocab)
    if sparse_new is not None:
        runner = sparse_new.forward
        rec["runner_stats"] = dict(runner.stats)
        rec["runner_failures"] = {str(k): v for k, v in runner.failed.items()}
    for row in rec.get("rows", []):
        ms = row.get("ms", {})
        best_dense = min((v for k, v in ms.items() if k.startswith("dense")), default=None)
        for name, value in ms.items():
            if best_dense and not name.startswith("dense"):
                row.setdefault("speedup_vs_best_dense", {})[name] = best_dense / value
    bench.save()
    # f. torch.compile(mode="reduce-overhead") on the 2:4 model, at the smallest shape, if there is time for it.
    bench._compile_target = sparse_new
    variants.clear()
    free()


def section_compile(bench: Bench, dense: nn.Module | None, vocab: int, seq: int) -> None:
    """f. torch.compile(mode='reduce-overhead') of the 2:4 model vs the hand-captured graph, compile time included."""
    rec = bench.section("f_compile_reduce_overhead")
    model = getattr(bench, "_compile_target", None)
    if model is None or not bench.cuda:
        bench.skip("f_compile_reduce_overhead", "needs CUDA and the 2:4 model")
        return
    if bench.left() < 100:
        bench.skip("f_compile_reduce_overhead", f"budget: {bench.left():.0f} s left, compile needs ~100 s")
        return
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(1)).to(bench.device)
    eager_forward = model.forward.fn
    try:
        compiled = torch.compile(eager_forward, mode="reduce-overhead")
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(3):  # cudagraph trees record on the 2nd/3rd call
                compiled(input_ids=ids, use_cache=False, logits_to_keep=1)
            sync()
            rec["compile_and_record_s"] = time.perf_counter() - t0
            graph_ref = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
            out = compiled(input_ids=ids, use_cache=False, logits_to_keep=1).logits
            rec["agreement_vs_graph"] = logits_agreement(graph_ref, out)
            rec["ms"] = interleaved_ms(
                {
                    "2:4 hand-captured graph": lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1),
                    "2:4 torch.compile reduce-overhead": lambda: compiled(
                        input_ids=ids, use_cache=False, logits_to_keep=1
                    ),
                },
                rounds=bench.args.rounds,
            )
        print(f"f compile: {rec}")
    except Exception as err:  # noqa: BLE001
        rec["error"] = error_record(err)
        traceback.print_exc(limit=3)
    bench.save()


# ----------------------------------------------------------------------------------------------------------------
# decoding


def to_bitsandbytes_(model: nn.Module, kind: str) -> nn.Module:
    """Swap Linear layers for bitsandbytes ones, as `quantize_model(..., "nf4"/"int8")` loads them (NF4 with double
    quantization and bf16 compute; LLM.int8 with threshold 6.0); in memory, to skip a multi-GB save/reload."""
    import bitsandbytes as bnb

    device = next(model.parameters()).device
    skip = default_skip_modules(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        weight = module.weight.data.to("cpu", torch.float16 if kind == "int8" else torch.bfloat16)
        bias = module.bias is not None
        if kind == "nf4":
            new = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=bias,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            new.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, compress_statistics=True, quant_type="nf4", module=new
            )
        else:
            new = bnb.nn.Linear8bitLt(
                module.in_features,
                module.out_features,
                bias=bias,
                has_fp16_weights=False,
                threshold=6.0,
                device="meta",
            )
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if bias:
            new.bias = nn.Parameter(module.bias.data.detach().cpu(), requires_grad=False)
        new = new.to(device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def bench_decode(bench: Bench, section: str, builders: dict, vocab: int, reference: str) -> None:
    """Batch-1 greedy decode tokens/s of each variant (name -> (builder, cuda_graphs)); built one by one, all kept
    resident, then timed interleaved."""
    rec = bench.section(section)
    args = bench.args
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(bench.device)
    decoders, tokens, memory = {}, {}, {}
    rec.setdefault("errors", {})
    for name, (build, graphs) in builders.items():
        if bench.left() < 25:
            rec["errors"][name] = "skipped: budget"
            continue
        try:
            sync()
            before = torch.cuda.memory_allocated() if bench.cuda else 0
            t0 = time.perf_counter()
            model = build()
            decoder = StaticCacheDecoder(
                model, args.prompt + args.new_tokens + 1, cuda_graphs=graphs, backend=bench.graph_backend
            )
            with torch.inference_mode():
                tokens[name] = decoder.generate(prompt, args.new_tokens)[0, args.prompt :].tolist()
            sync()
            memory[name] = {
                "build_s": time.perf_counter() - t0,
                "cuda_allocated_gib": ((torch.cuda.memory_allocated() - before) / 2**30) if bench.cuda else None,
                "graph_stats": dict(decoder.runner.stats) if decoder.runner else None,
                "graph_failures": [v for v in decoder.runner.failed.values()] if decoder.runner else None,
            }
            decoders[name] = decoder
        except Exception as err:  # noqa: BLE001
            rec["errors"][name] = error_record(err)
            traceback.print_exc(limit=3)
        rec["memory"] = memory
        bench.save()
    samples: dict[str, list[float]] = {n: [] for n in decoders}
    names = list(decoders)
    rounds = args.decode_rounds
    for i in range(rounds + 1):
        if bench.left() < 10:
            break
        for name in names if i % 2 == 0 else names[::-1]:
            decoder = decoders[name]
            first = decoder.prefill(prompt)
            sync()
            t0 = time.perf_counter()
            decoder.decode(first, args.new_tokens)
            sync()
            if i:
                samples[name].append(args.new_tokens / (time.perf_counter() - t0))
    tps = {n: statistics.median(v) for n, v in samples.items() if v}
    rec["tokens_per_s"] = tps
    if reference in tps:
        rec["speedup_vs_" + reference.replace(" ", "_")] = {n: v / tps[reference] for n, v in tps.items()}
    if reference in tokens:
        rec["token_agreement_vs_" + reference.replace(" ", "_")] = {
            n: sum(a == b for a, b in zip(t, tokens[reference])) / len(t) for n, t in tokens.items()
        }
    rec["rounds"] = rounds
    bench.save()
    print(f"{section}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in tps.items()))
    decoders.clear()
    free()


def section_decode_synthetic(bench: Bench, master: nn.Module, vocab: int) -> None:
    """c. batch-1 decode: bf16 vs int4 (tinygemm) vs bitsandbytes, and the 2:4 / 2:4+fp8 models."""
    base = copy.deepcopy(master).to(torch.bfloat16).eval()

    def int4():
        model = copy.deepcopy(base)
        names = quantize_int4_for_decoding_(model, group_size=128)
        bench.section("c_decode_batch1")["int4_layers"] = len(names)
        return model

    def sparse(fmt: str):
        def build():
            model = copy.deepcopy(base)
            plan = accelerate_sparse_inference_(
                model, SparseInferenceConfig(policy="all", weight_format=fmt, cuda_graphs=False)
            )
            bench.section("c_decode_batch1")[f"{fmt}_layers"] = len(plan.sparse_modules)
            return model

        return build

    builders = {
        "bf16 graphs": (lambda: base, True),
        "bf16 eager": (lambda: base, False),
    }
    if bench.cuda:
        builders["int4 tinygemm graphs"] = (int4, True)
    builders["nf4 graphs"] = (lambda: to_bitsandbytes_(copy.deepcopy(base), "nf4"), True)
    builders["int8 graphs"] = (lambda: to_bitsandbytes_(copy.deepcopy(base), "int8"), True)
    if bench.cuda:
        builders["2:4 bf16 graphs"] = (sparse("2:4"), True)
        builders["2:4+fp8 graphs"] = (sparse("2:4-fp8"), True)
    else:
        bench.section("c_decode_batch1")["skipped_variants"] = "int4 tinygemm, 2:4, 2:4+fp8: CUDA kernels only"
    bench_decode(bench, "c_decode_batch1", builders, vocab, "bf16 graphs")
    builders.clear()
    free()


def section_combined_prefill(bench: Bench, master: nn.Module, token_shapes, vocab: int) -> None:
    """d. bf16 prefill: dense, 2:4 (graphs), dense fp8, 2:4 + fp8 (torchao CUTLASS), all graphed."""
    if not bench.cuda:
        bench.skip("d_prefill_combined_bf16", "2:4 and fp8 kernels need CUDA (fp8 2:4: sm90)")
        return
    rec = bench.section("d_prefill_combined_bf16")
    dense = copy.deepcopy(master).to(torch.bfloat16).eval()
    dense_graph = CUDAGraphRunner(dense.forward)
    variants = {
        "bf16 dense eager": lambda ids: dense(input_ids=ids, use_cache=False, logits_to_keep=1),
        "bf16 dense graph": lambda ids: dense_graph(input_ids=ids, use_cache=False, logits_to_keep=1),
    }
    models = {}
    for name, fmt in (("bf16 2:4 graph", "2:4"), ("fp8 2:4 graph", "2:4-fp8")):
        try:
            model = copy.deepcopy(dense)
            plan = accelerate_sparse_inference_(model, SparseInferenceConfig(policy="all", weight_format=fmt))
            rec[f"{name} layers"] = len(plan.sparse_modules)
            models[name] = model
            variants[name] = lambda ids, m=model: m(input_ids=ids, use_cache=False, logits_to_keep=1)
        except Exception as err:  # noqa: BLE001
            rec.setdefault("errors", {})[name] = error_record(err)
            traceback.print_exc(limit=3)
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        fp8 = copy.deepcopy(dense)
        quantize_(
            fp8,
            Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False),
            filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and "lm_head" not in fqn,
        )
        fp8_graph = CUDAGraphRunner(fp8.forward)
        variants["fp8 dense graph"] = lambda ids: fp8_graph(input_ids=ids, use_cache=False, logits_to_keep=1)
    except Exception as err:  # noqa: BLE001
        rec.setdefault("errors", {})["fp8 dense graph"] = error_record(err)
    bench.save()
    bench_prefill(bench, "d_prefill_combined_bf16", dense, variants, token_shapes, vocab)
    for row in rec.get("rows", []):
        ms = row.get("ms", {})
        best = min((v for k, v in ms.items() if k.startswith("bf16 dense")), default=None)
        if best:
            row["speedup_vs_best_bf16_dense"] = {k: best / v for k, v in ms.items()}
    bench.save()
    models.clear()
    free()


# ----------------------------------------------------------------------------------------------------------------
# one linear


def section_linear(bench: Bench) -> None:
    """a. one fp16 linear, 2:4 vs dense, eager and graphed, 1 .. 16,384 rows."""
    rec = bench.section("a_linear_fp16")
    if not bench.cuda:
        bench.skip("a_linear_fp16", "2:4 kernels need CUDA")
        return
    rows_list = [int(r) for r in bench.args.linear_rows.split(",")]
    rec["rows"] = []
    for out_f, in_f in LINEAR_SHAPES:
        torch.manual_seed(0)
        holder = nn.ModuleList([nn.Linear(in_f, out_f, bias=False)]).to("cuda", torch.float16)
        prune_(holder, PruningConfig(pattern="2:4"))
        dense = holder[0]
        sparse = copy.deepcopy(holder)
        to_semi_structured_sparse_(sparse)
        sparse = sparse[0]
        dense_graph = CUDAGraphRunner(dense.forward, clone_outputs=False, max_graphs=len(rows_list))
        sparse_graph = CUDAGraphRunner(sparse.forward, clone_outputs=False, max_graphs=len(rows_list))
        for rows in rows_list:
            if bench.left() < 15:
                rec["rows"].append({"shape": [out_f, in_f], "rows": rows, "skipped": "budget"})
                continue
            x = torch.randn(rows, in_f, device="cuda", dtype=torch.float16)
            with torch.inference_mode():
                diff = (dense(x) - sparse_graph(x)).abs().max().item()
                reps = 50 if rows <= 256 else 10
                fns = {
                    "dense eager": dense,
                    "dense graph": dense_graph,
                    "2:4 eager": sparse,
                    "2:4 graph": sparse_graph,
                }
                t = interleaved_ms(
                    {name: (lambda fn=fn, x=x: fn(x)) for name, fn in fns.items()},
                    rounds=bench.args.rounds,
                    warmup=1,
                    reps=reps,
                )
            best_dense = min(t["dense eager"], t["dense graph"])
            entry = {
                "shape": [out_f, in_f],
                "rows": rows,
                "ms": t,
                "speedup_graph_vs_best_dense": best_dense / t["2:4 graph"],
                "speedup_eager_vs_dense_eager": t["dense eager"] / t["2:4 eager"],
                "max_abs_diff": diff,
            }
            rec["rows"].append(entry)
            bench.save()
            print(
                f"linear {out_f}x{in_f} rows {rows}: dense {t['dense eager']:.4f}/{t['dense graph']:.4f} ms, "
                f"2:4 {t['2:4 eager']:.4f}/{t['2:4 graph']:.4f} ms -> {entry['speedup_graph_vs_best_dense']:.2f}x"
            )
        dense = sparse = dense_graph = sparse_graph = holder = None
        free()


# ----------------------------------------------------------------------------------------------------------------
# parts


def part_synthetic(bench: Bench) -> None:
    args = bench.args
    spec = SMOKE if args.smoke else SYNTHETIC
    layers = 2 if args.smoke else args.layers
    token_shapes = [(1, 32), (2, 32)] if args.smoke else [(1, 2048), (2, 2048), (4, 2048)]
    t0 = time.perf_counter()
    master = build_llama(spec, layers, torch.float16 if bench.cuda else torch.float32, bench.device)
    prune_(master, PruningConfig(pattern="2:4"))
    n_params = sum(p.numel() for p in master.parameters())
    bench.payload["model"] = {**spec, "num_hidden_layers": layers, "parameters": n_params, "pruning": "2:4"}
    bench.payload["build_s"] = time.perf_counter() - t0
    bench.save()
    print(
        f"model: {n_params / 1e9:.2f}B parameters, {layers} layers, built + pruned in {bench.payload['build_s']:.1f}s"
    )
    vocab = spec["vocab_size"]
    guarded(bench, "b_prefill_2to4_fp16", section_prefill_sparse, master, token_shapes, vocab)
    guarded(bench, "c_decode_batch1", section_decode_synthetic, master, vocab)
    guarded(bench, "d_prefill_combined_bf16", section_combined_prefill, master, token_shapes, vocab)
    del master
    free()
    guarded(bench, "a_linear_fp16", section_linear)
    guarded(bench, "f_compile_reduce_overhead", section_compile, None, vocab, token_shapes[0][1])


def wikitext_windows(tokenizer, data_dir: str | None, window: int, count: int) -> torch.Tensor | None:
    candidates = [data_dir] if data_dir else ["../shared/data/wikitext2", ".gpudata/wikitext2"]
    for folder in candidates:
        path = Path(folder) / "test.txt"
        if path.is_file():
            text = path.read_text(encoding="utf-8")[: 40 * window * count]
            ids = tokenizer(text, return_tensors="pt").input_ids[0]
            n = min(count, ids.numel() // window)
            return ids[: n * window].view(n, window)
    return None


@torch.inference_mode()
def perplexity(forward, windows: torch.Tensor, batch: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, windows.shape[0] - batch + 1, batch):
        ids = windows[start : start + batch]
        logits = forward(ids).logits.float()
        nll += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def part_smollm2(bench: Bench) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress import quantize_model, smollm2_folder

    args = bench.args
    t0 = time.perf_counter()
    try:
        folder = smollm2_folder()
    except Exception as err:  # noqa: BLE001
        bench.skip("smollm2", f"SmolLM2 not available: {error_record(err)}")
        return
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(bench.device).eval()
    window, count, batch = (32, 2, 1) if args.smoke else (512, 32, 8)
    windows = wikitext_windows(tokenizer, args.data_dir, window, count)
    # The decoding section (e2) serves the pretrained model as it is (bf16): decode speed depends on the weights'
    # format, and its perplexities (int4 export vs bf16) only mean something on the unpruned model.
    unpruned = copy.deepcopy(model).to(torch.bfloat16 if bench.cuda else torch.float32).eval()
    if windows is not None and bench.cuda:  # context: the model before one-shot 2:4 pruning
        bench.payload["perplexity_unpruned_bf16"] = perplexity(
            lambda ids: unpruned(input_ids=ids, use_cache=False), windows.to(bench.device), batch
        )
    prune_(model, PruningConfig(pattern="2:4"))
    bench.payload["model"] = {"name": "SmolLM2-135M-Instruct", "parameters": model.num_parameters(), "pruning": "2:4"}
    bench.payload["load_s"] = time.perf_counter() - t0
    vocab = model.config.vocab_size

    # e1. prefill + perplexity through the 2:4 inference path (bf16: SmolLM2 was trained in bf16, fp16 activations
    # may overflow), same weights as the dense pruned model.
    rec = bench.section("e_smollm2_prefill_2to4_bf16")
    dense = copy.deepcopy(model).to(torch.bfloat16 if bench.cuda else torch.float32).eval()
    dense_graph = CUDAGraphRunner(dense.forward, backend=bench.graph_backend)
    variants = {
        "dense eager": lambda ids: dense(input_ids=ids, use_cache=False),
        "dense graph": lambda ids: dense_graph(input_ids=ids, use_cache=False),
    }
    sparse = None
    if bench.cuda:
        sparse = copy.deepcopy(dense)
        plan = accelerate_sparse_inference_(sparse, SparseInferenceConfig(tokens=batch * window))
        rec["plan_markdown"] = plan.to_markdown()
        rec["sparse_layers"] = len(plan.sparse_modules)
        rec["dense_layers"] = len(plan.dense_modules)
        print(plan.to_markdown())
        variants["2:4 graph (measured policy)"] = lambda ids: sparse(input_ids=ids, use_cache=False)
        if not plan.sparse_modules:
            forced = copy.deepcopy(dense)
            accelerate_sparse_inference_(forced, SparseInferenceConfig(policy="all"))
            variants["2:4 graph (policy=all)"] = lambda ids: forced(input_ids=ids, use_cache=False)
    if windows is not None:
        rec["perplexity"] = {}
        for name, fn in variants.items():
            if bench.left() < 20:
                break
            rec["perplexity"][name] = perplexity(fn, windows.to(bench.device), batch)
        rec["perplexity_windows"] = [int(windows.shape[0]), window]
        bench.save()
        print(f"perplexity: {rec['perplexity']}")
    else:
        rec["perplexity"] = "skipped: no WikiText-2 test.txt (pass --data-dir)"
    bench_prefill(
        bench,
        "e_smollm2_prefill_2to4_bf16",
        dense,
        {k: (lambda ids, fn=v: fn(ids)) for k, v in variants.items()},
        [(batch, window)],
        vocab,
    )
    variants.clear()
    dense = dense_graph = sparse = None
    free()

    # e2. batch-1 decoding of the unpruned model: bf16 vs the int4 export (saved, reloaded) vs bitsandbytes.
    base = unpruned
    del model
    export = {}

    def int4_export():
        tmp = tempfile.mkdtemp(prefix="serve_fast_int4_")
        quantized = quantize_model(base, "torchao-int4-cuda", group_size=64, output_dir=tmp, overwrite=True)
        export["disk_mb"] = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")) / 1e6
        try:  # the export must reload with stock from_pretrained and compute the same logits
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, device_map={"": 0}).eval()
            probe = windows[:1, :64].to(bench.device) if windows is not None else torch.arange(64)[None].cuda()
            with torch.inference_mode():
                export["reload_max_abs_logit_diff"] = (
                    (reloaded(input_ids=probe).logits.float() - quantized(input_ids=probe).logits.float())
                    .abs()
                    .max()
                    .item()
                )
        except Exception as err:  # noqa: BLE001
            export["reload_error"] = error_record(err)
            traceback.print_exc(limit=3)
            reloaded = quantized
        if windows is not None:
            export["perplexity_int4"] = perplexity(
                lambda ids: reloaded(input_ids=ids, use_cache=False), windows.to(bench.device), batch
            )
            export["perplexity_bf16"] = perplexity(
                lambda ids: base(input_ids=ids, use_cache=False), windows.to(bench.device), batch
            )
        bench.section("e_smollm2_decode_batch1")["int4_export"] = export
        return reloaded

    builders = {"bf16 graphs": (lambda: base, True), "bf16 eager": (lambda: base, False)}
    if bench.cuda:
        builders["int4 export graphs"] = (int4_export, True)
    if not args.smoke:  # on CPU the synthetic --smoke covers these paths; here they would take minutes
        builders["nf4 graphs"] = (lambda: to_bitsandbytes_(copy.deepcopy(base), "nf4"), True)
        builders["int8 graphs"] = (lambda: to_bitsandbytes_(copy.deepcopy(base), "int8"), True)
    bench_decode(bench, "e_smollm2_decode_batch1", builders, vocab, "bf16 graphs")


# ----------------------------------------------------------------------------------------------------------------
# summary


def summary(bench: Bench) -> None:
    sections = bench.payload["sections"]
    print(f"\n# serve_fast ({bench.args.part}): {bench.payload['env']['device']}, torch {torch.__version__}")
    print(
        f"model: {bench.payload.get('model')}; medians of interleaved rounds; elapsed {bench.payload['elapsed_s']:.0f} s"
    )
    for name, rec in sections.items():
        print(f"\n## {name}")
        if "skipped" in rec:
            print(f"skipped: {rec['skipped']}")
            continue
        if "plan_markdown" in rec:
            print(rec["plan_markdown"] + "\n")
        rows = [r for r in rec.get("rows", []) if "ms" in r]
        if rows and "batch" in rows[0]:
            names = list(rows[0]["ms"])
            ratio_key = next((k for k in rows[0] if k.startswith("speedup_vs")), None)
            header = ["batch x seq"] + [f"{n} (ms)" for n in names] + [f"x {n}" for n in names if ratio_key]
            table = []
            for r in rows:
                ratios = r.get(ratio_key, {}) if ratio_key else {}
                table.append(
                    [f"{r['batch']}x{r['seq']}"]
                    + [r["ms"].get(n) for n in names]
                    + ([ratios.get(n) for n in names] if ratio_key else [])
                )
            print(markdown_table(header, table))
            worst = {
                n: max((r["agreement"].get(n, {}).get("relative", 0.0) for r in rows), default=None) for n in names
            }
            print(f"max |logit diff| / max |logit| vs dense eager: {worst}")
        elif rows:
            header = [
                "out x in",
                "rows",
                "dense eager",
                "dense graph",
                "2:4 eager",
                "2:4 graph",
                "2:4 graph / best dense",
            ]
            table = [
                [
                    f"{r['shape'][0]}x{r['shape'][1]}",
                    r["rows"],
                    r["ms"]["dense eager"],
                    r["ms"]["dense graph"],
                    r["ms"]["2:4 eager"],
                    r["ms"]["2:4 graph"],
                    r["speedup_graph_vs_best_dense"],
                ]
                for r in rows
            ]
            print(markdown_table(header, table))
        if "tokens_per_s" in rec:
            tps = rec["tokens_per_s"]
            ratio = next((v for k, v in rec.items() if k.startswith("speedup_vs")), {})
            agree = next((v for k, v in rec.items() if k.startswith("token_agreement")), {})
            print(
                markdown_table(
                    ["variant", "tokens/s", "x bf16 graphs", "greedy tokens equal to bf16"],
                    [[n, tps[n], ratio.get(n), agree.get(n)] for n in tps],
                )
            )
            if rec.get("errors"):
                print(f"errors: {rec['errors']}")
        if "perplexity" in rec:
            print(f"perplexity: {rec['perplexity']}")
        if "int4_export" in rec:
            print(f"int4 export: {rec['int4_export']}")
        if "ms" in rec and not rows:
            print(f"{rec['ms']} (compile + record {rec.get('compile_and_record_s')} s)")
        for key in ("error", "errors", "runner_failures"):
            if rec.get(key) and key != "errors" or (key == "errors" and rec.get(key) and "tokens_per_s" not in rec):
                print(f"{key}: {rec[key]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["synthetic", "smollm2"], default="synthetic")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (graphs emulated), < 60 s")
    parser.add_argument("--budget-s", type=float, default=None, help="default 270 (synthetic) / 90 (smollm2)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the synthetic 7B-wide model")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per timing (default 7; 2 smoke)")
    parser.add_argument("--decode-rounds", type=int, default=None, help="default 5 (2 with --smoke)")
    parser.add_argument("--prompt", type=int, default=32, help="decode prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per round (default 64; 8 smoke)")
    parser.add_argument("--linear-rows", default="1,16,64,256,1024,2048,4096,8192,16384")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="WikiText-2 folder (default ../shared/data/wikitext2, else .gpudata/wikitext2)",
    )
    args = parser.parse_args()
    if not has_cuda() and not args.smoke:
        parser.error("no CUDA device: run with --smoke on CPU")
    args.budget_s = args.budget_s or (270.0 if args.part == "synthetic" else 90.0)
    args.rounds = args.rounds or (2 if args.smoke else 7)
    args.decode_rounds = args.decode_rounds or (2 if args.smoke else 5)
    args.new_tokens = args.new_tokens or (8 if args.smoke else 64)
    if args.smoke:
        args.prompt = min(args.prompt, 8)
    if args.data_dir is None:
        args.data_dir = next((d for d in ("../shared/data/wikitext2", ".gpudata/wikitext2") if Path(d).is_dir()), None)
    torch.backends.cuda.matmul.allow_tf32 = True
    bench = Bench(args)
    try:
        part_synthetic(bench) if args.part == "synthetic" else part_smollm2(bench)
    finally:
        bench.save()
        summary(bench)
        print(f"wrote {os.path.join(os.environ.get('OUT', 'benchmarks/gpu/results'), bench.name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
