"""Scaling of the combined run (distillation + pruning + QAT) over N GPUs under DDP, FSDP2 and DeepSpeed ZeRO-3.

One `accelerate launch` of this script is one measurement: a `DistillationTrainer` run with `PruningCallback`
(50% unstructured, magnitude, one shot at step 0, masks re-applied after every optimizer step) and `QATCallback`
(int8 dynamic activations / int4 weights from step 0) on random tokens, with a student and a teacher built from Llama
configs directly on the GPU (random weights; no CPU initialisation, nothing read from disk). Rank 0 writes
`$OUT/scaling_<tag>.json`: median step time after `--warmup` steps (CUDA-synchronised), tokens per second over all
ranks, per-rank peak `max_memory_allocated`, and the bytes of teacher / student parameters each rank holds (full
copy under DDP, DTensor shard under FSDP2, partition under ZeRO-3).

    # N = 1 and 2, DDP / FSDP2 / ZeRO-3 (benchmarks/gpu/run_issue12.sh does all of it):
    accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2 benchmarks/gpu/scaling.py --tag ddp_n2
    accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 2 benchmarks/gpu/scaling.py \\
        --tag fsdp2_n2
    python benchmarks/gpu/scaling.py --summarize          # Markdown tables from $OUT/scaling_*.json

`--presharded` (FSDP2 only) builds both models on the meta device, shards them with `fully_shard` and only then
allocates each rank's shards on its GPU and fills them: a pair that never exists whole anywhere, e.g. a 32B-shaped
bf16 teacher and a 7B-shaped student trained with AdamW (`--student 7b --teacher 32b --presharded`), which does not
fit one H200 under DDP (63 GB teacher + 108 GB of student weights, gradients and Adam states).

`--smoke` runs the same code on CPU with tiny shapes (one process, or several under `ACCELERATE_USE_CPU=1`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py when launched by accelerate

from common import NVLINK_MULTICAST_OFF, markdown_table  # noqa: E402, F401  (importing sets NVLink multicast off)

# Llama shapes (random weights). "1b" ~ TinyLlama-1.1B, "3b" ~ Llama-3.2-3B, "7b" ~ Llama-2-7B, "32b" ~ a 32B model
# (Qwen2.5-32B widths), all with a 32k vocabulary so any student/teacher pair shares it.
SHAPES = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    ),
    "tiny-teacher": dict(
        hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256
    ),
    "1b": dict(
        hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632
    ),
    "3b": dict(
        hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, intermediate_size=8192
    ),
    "7b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008
    ),
    "32b": dict(
        hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8, intermediate_size=27648
    ),
}
VOCAB = {"tiny": 256, "tiny-teacher": 256}
DEFAULT_VOCAB = 32000


def llama_config(shape: str, seq_len: int):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is unknown; choose one of {sorted(SHAPES)}.")
    return LlamaConfig(
        vocab_size=VOCAB.get(shape, DEFAULT_VOCAB),
        max_position_embeddings=max(2048, seq_len),
        tie_word_embeddings=False,
        use_cache=False,
        **SHAPES[shape],
    )


def num_parameters(shape: str) -> int:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(llama_config(shape, 2048)).parameters())


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(config, device: torch.device, dtype: torch.dtype, seed: int):
    """The model with random weights, initialised directly on `device` in `dtype` (no CPU copy)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        return LlamaForCausalLM(config)


@torch.no_grad()
def build_presharded(config, device: torch.device, dtype: torch.dtype, seed: int, mp_policy=None):
    """The model sharded with FSDP2 before any weight exists: built on the meta device, `fully_shard` per decoder
    layer and at the root, then each rank allocates its shards on `device` and fills them (normal(0, 0.02), norms
    at 1); the rotary tables, which are buffers outside the state dict, are rebuilt on `device`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaForCausalLM

    with torch.device("meta"), default_dtype(dtype):
        model = LlamaForCausalLM(config)
    kwargs = {"mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed + torch.distributed.get_rank())
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if name.endswith("norm.weight"):
            local.fill_(1.0)
        else:
            local.normal_(0.0, config.initializer_range, generator=generator)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if "inv_freq" in dict(child.named_buffers(recurse=False)):
                with torch.device(device):
                    setattr(parent, child_name, type(child)(config))
    return model


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        self.n, self.seq_len, self.vocab, self.seed = n, seq_len, vocab, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ids = torch.randint(0, self.vocab, (self.seq_len,), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def local_param_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes of `module`'s parameters held on this rank, bytes of the whole parameters)."""
    local = full = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3 partition
            local += p.ds_tensor.numel() * p.ds_tensor.element_size()
            full += p.ds_numel * p.ds_tensor.element_size()
        elif hasattr(p, "to_local"):  # DTensor (FSDP2)
            t = p.to_local()
            local += t.numel() * t.element_size()
            full += p.numel() * t.element_size()
        else:
            local += p.numel() * p.element_size()
            full += p.numel() * p.element_size()
    return local, full


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _all_ranks_agree(flag: bool) -> bool:
    """True on every rank if it is True on any rank (so all ranks stop at the same step)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _gather(obj) -> list:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def make_timer_callback(budget_s: float | None):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """CUDA-synchronised wall time of every optimizer step (forward, backward, optimizer, callbacks); stops the
        run on every rank once `budget_s` has passed since training began."""

        def __init__(self):
            self.times: list[float] = []
            self.student_bytes: tuple[int, int] | None = None
            self._start = self._began = None

        def on_train_begin(self, args, state, control, **kwargs):
            self._began = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            _sync()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            _sync()
            self.times.append(time.perf_counter() - self._start)
            if self.student_bytes is None and model is not None:
                self.student_bytes = local_param_bytes(model)
            if budget_s is not None and _all_ranks_agree(time.perf_counter() - self._began > budget_s):
                control.should_training_stop = True

    return StepTimer()


def run(args) -> dict | None:
    from hf_compress import DistillationConfig, DistillationTrainer, PruningCallback, PruningConfig, QATCallback

    cuda = torch.cuda.is_available() and not args.smoke
    if args.presharded:
        # The models come sharded already (FSDPLlamaDecoderLayer): accelerate must not look for layers to wrap.
        os.environ["FSDP_AUTO_WRAP_POLICY"] = "NO_WRAP"
    training_args = DistillationConfig(
        output_dir=str(Path(args.output_dir) / args.tag),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-5,
        # torch's AdamW (foreach) in every run, DDP and sharded alike (DTensor parameters under FSDP2).
        optim="adamw_torch",
        lr_scheduler_type="constant",
        logging_steps=max(1, args.steps // 4),
        save_strategy="no",
        report_to="none",
        seed=0,
        bf16=cuda,
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=True,
        dataloader_drop_last=True,
        gradient_checkpointing=args.gradient_checkpointing,
        alpha=0.5,
        temperature=2.0,
    )
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    s_config, t_config = llama_config(args.student, args.seq_len), llama_config(args.teacher, args.seq_len)
    teacher_dtype = torch.bfloat16 if cuda else torch.float32
    built = time.perf_counter()
    if args.presharded:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else None
        student = build_presharded(s_config, device, torch.float32, seed=1, mp_policy=mp)
        teacher = build_presharded(t_config, device, teacher_dtype, seed=2)
    else:
        student = build(s_config, device, torch.float32, seed=1)
        teacher = build(t_config, device, teacher_dtype, seed=2)
    build_seconds = time.perf_counter() - built

    callbacks = []
    if not args.no_pruning:
        callbacks.append(PruningCallback(PruningConfig(sparsity=0.5, schedule="oneshot", start_step=0)))
    if not args.no_qat:
        callbacks.append(QATCallback(start_step=0, group_size=32, save_quantized=False))
    timer = make_timer_callback(args.budget_s)
    callbacks.append(timer)
    rows = args.batch_size * world * (args.steps + 1)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=RandomTokens(rows, args.seq_len, s_config.vocab_size),
        callbacks=callbacks,
    )
    distributed_type = str(trainer.accelerator.distributed_type).split(".")[-1]
    if getattr(trainer.accelerator, "is_fsdp2", False):
        distributed_type = "FSDP2"
    teacher_local, teacher_full = local_param_bytes(trainer.teacher_model)
    if cuda:
        _sync()
        allocated_after_setup = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    _sync()
    memory = {
        "rank": rank,
        "teacher_local_param_bytes": teacher_local,
        "teacher_full_param_bytes": teacher_full,
        "student_local_param_bytes": timer.student_bytes[0] if timer.student_bytes else None,
        "student_full_param_bytes": timer.student_bytes[1] if timer.student_bytes else None,
        "cuda_allocated_after_setup": allocated_after_setup if cuda else None,
        "cuda_max_allocated_train": torch.cuda.max_memory_allocated() if cuda else None,
        "teacher_type": type(trainer.teacher_model).__name__,
    }
    memory_all = _gather(memory)
    step_times = _gather(timer.times)
    if rank != 0:
        return None
    # A step ends when the slowest rank ends it (collectives): the step time of the run is the max over ranks.
    per_step = [max(ts[i] for ts in step_times) for i in range(min(len(ts) for ts in step_times))]
    measured = per_step[args.warmup :]
    median = statistics.median(measured) if measured else None
    tokens_per_step = args.batch_size * args.seq_len * world
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "tag": args.tag,
        "distributed_type": distributed_type,
        "world_size": world,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "student": args.student,
        "teacher": args.teacher,
        "student_parameters": num_parameters(args.student),
        "teacher_parameters": num_parameters(args.teacher),
        "presharded": args.presharded,
        "pruning": not args.no_pruning,
        "qat": not args.no_qat,
        "batch_size_per_device": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_per_step": tokens_per_step,
        "steps_run": len(per_step),
        "warmup_steps": args.warmup,
        "step_seconds": per_step,
        "step_seconds_median": median,
        "tokens_per_second": tokens_per_step / median if median else None,
        "build_seconds": build_seconds,
        "losses": losses,
        "losses_finite": all(x == x and abs(x) != float("inf") for x in losses),
        "memory": memory_all,
    }


# ------------------------------------------------------------------------------------------------------ summary
def summarize(out_dir: Path) -> dict:
    runs = {}
    for path in sorted(out_dir.glob("scaling_*.json")):
        data = json.loads(path.read_text())
        if "tag" in data:
            runs[data["tag"]] = data
    gib = 2**30
    rows, memory_rows = [], []
    one_gpu = {r["distributed_type"]: r for r in runs.values() if r["world_size"] == 1 and not r["presharded"]}
    ddp_teacher = {
        r["world_size"]: r["memory"][0]["teacher_local_param_bytes"]
        for r in runs.values()
        if r["distributed_type"] in ("MULTI_GPU", "NO", "MULTI_CPU") and not r["presharded"]
    }
    efficiencies = {}
    order = sorted(runs.items(), key=lambda kv: (kv[1]["presharded"], kv[1]["distributed_type"], kv[1]["world_size"]))
    for tag, r in order:
        # Scaling efficiency: tokens/s over N x tokens/s on one GPU, against the same type on one GPU (DDP's single
        # process runs as plain "NO") and against the plain single-GPU run.
        same_type = "NO" if r["distributed_type"] in ("MULTI_GPU", "MULTI_CPU") else r["distributed_type"]
        effs = []
        for base in (one_gpu.get(same_type), one_gpu.get("NO")):
            eff = None
            if base and base.get("tokens_per_second") and r.get("tokens_per_second") and not r["presharded"]:
                eff = r["tokens_per_second"] / (r["world_size"] * base["tokens_per_second"])
            effs.append(eff)
        efficiencies[tag] = {"vs_same_type_n1": effs[0], "vs_plain_1gpu": effs[1]}
        rows.append(
            [
                tag,
                r["distributed_type"],
                r["world_size"],
                f"{r['student']}/{r['teacher']}",
                r["tokens_per_step"],
                r["steps_run"],
                None if r["step_seconds_median"] is None else r["step_seconds_median"] * 1e3,
                r["tokens_per_second"],
                effs[0],
                effs[1],
            ]
        )
        for m in r["memory"]:
            share = None
            if r["world_size"] in ddp_teacher and not r["presharded"]:
                share = m["teacher_local_param_bytes"] / ddp_teacher[r["world_size"]]
            memory_rows.append(
                [
                    tag,
                    m["rank"],
                    m["teacher_type"],
                    m["teacher_local_param_bytes"] / gib,
                    m["teacher_full_param_bytes"] / gib,
                    share,
                    None if m["student_local_param_bytes"] is None else m["student_local_param_bytes"] / gib,
                    None if m["cuda_max_allocated_train"] is None else m["cuda_max_allocated_train"] / gib,
                ]
            )
    print("## Combined run (distillation + 50% pruning + QAT): throughput")
    print(
        markdown_table(
            [
                "run",
                "type",
                "N",
                "student/teacher",
                "tokens/step",
                "steps",
                "step ms (median)",
                "tokens/s",
                "efficiency vs same type N=1",
                "efficiency vs plain 1 GPU",
            ],
            rows,
        )
    )
    print("\n## Memory per rank")
    print(
        markdown_table(
            [
                "run",
                "rank",
                "teacher",
                "teacher params held (GiB)",
                "teacher full (GiB)",
                "teacher share of DDP's",
                "student params held (GiB)",
                "peak allocated (GiB)",
            ],
            memory_rows,
        )
    )
    summary = {"benchmark": "scaling", "runs": runs, "scaling_efficiency": efficiencies}
    (out_dir / "scaling.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default=None, help=f"one of {sorted(SHAPES)} (default 1b; tiny with --smoke)")
    p.add_argument("--teacher", default=None, help="default 3b (tiny-teacher with --smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="per device (default 8; 2 with --smoke)")
    p.add_argument("--seq-len", type=int, default=None, help="default 1024 (32 with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 12; 4 with --smoke)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the median (default 3; 1 smoke)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-pruning", action="store_true")
    p.add_argument("--no-qat", action="store_true")
    p.add_argument("--presharded", action="store_true", help="FSDP2: build on meta, shard, then allocate shards")
    p.add_argument("--tag", default=None, help="name of this run in $OUT/scaling_<tag>.json")
    p.add_argument("--budget-s", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--output-dir", default="/tmp/hf_compress_scaling")
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU")
    p.add_argument("--summarize", action="store_true", help="print the tables of $OUT/scaling_*.json and exit")
    args = p.parse_args(argv)
    args.student = args.student or ("tiny" if args.smoke else "1b")
    args.teacher = args.teacher or ("tiny-teacher" if args.smoke else "3b")
    args.batch_size = args.batch_size or (2 if args.smoke else 8)
    args.seq_len = args.seq_len or (32 if args.smoke else 1024)
    args.steps = args.steps or (4 if args.smoke else 12)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    if args.warmup >= args.steps:
        p.error(f"--warmup {args.warmup} must be smaller than --steps {args.steps}")
    for name in ("student", "teacher"):
        if getattr(args, name) not in SHAPES:
            p.error(f"--{name} {getattr(args, name)!r}: choose one of {sorted(SHAPES)}")
    if not args.smoke and not args.summarize and not torch.cuda.is_available():
        p.error("no CUDA device: run with --smoke on CPU")
    return args


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(os.environ.get("OUT", "benchmarks/gpu/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        summarize(out_dir)
        return
    world = int(os.environ.get("WORLD_SIZE", 1))
    args.tag = args.tag or f"{'presharded_' if args.presharded else ''}n{world}"
    result = run(args)
    if result is None:
        return
    path = out_dir / f"scaling_{args.tag}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    gib = 2**30
    peak = [m["cuda_max_allocated_train"] for m in result["memory"]]
    print(
        f"## {args.tag}: {result['distributed_type']} x{world}, {args.student} student / {args.teacher} teacher: "
        f"median step {result['step_seconds_median']:.4f} s over {len(result['step_seconds']) - args.warmup} steps, "
        f"{result['tokens_per_second']:.0f} tokens/s; teacher held per rank "
        f"{[round(m['teacher_local_param_bytes'] / gib, 3) for m in result['memory']]} GiB of "
        f"{result['memory'][0]['teacher_full_param_bytes'] / gib:.3f}; peak "
        f"{[None if p is None else round(p / gib, 2) for p in peak]} GiB; losses finite {result['losses_finite']}"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
