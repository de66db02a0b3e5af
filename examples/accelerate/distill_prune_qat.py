"""Distillation + gradual pruning + quantization-aware training of a small causal LM under `accelerate launch`.

One ordinary `DistillationTrainer` run with two callbacks, `PruningCallback` and `QATCallback`, on several
processes (DDP, FSDP2 or DeepSpeed ZeRO-3: pick the accelerate config), and the checks that multi-GPU jobs break
most often, each printed and written to `results.json`:

- the training loss goes down (mean of the last logged losses below the mean of the first ones);
- the pruning masks hold on every rank after every optimizer step: a callback gathers, with
  `torch.distributed.all_gather_object`, each rank's mask checksum, sparsity and the number of pruned positions
  whose weight is not zero, and fails unless the checksums are identical and that number is 0 everywhere;
- the teacher's memory per rank: parameter bytes the teacher holds locally on each rank (a DTensor shard under
  FSDP2, a ZeRO-3 partition under DeepSpeed, the full copy under DDP) and `torch.cuda.max_memory_allocated`, so
  a sharded run can be compared with the DDP run;
- the final checkpoint (`trainer.save_model`) reloads on one device with stock `from_pretrained` on rank 0 and
  gives the logits the trained model gives; the `QATCallback`'s quantized model reloads too.

With `--peft` the student is a LoRA model on a base pruned once before training (`prune_`), and the final
checkpoint is the adapter, loaded by stock `AutoModelForCausalLM.from_pretrained` with the pruned base.

The models are built from Llama configs (no download): a student and a wider, deeper teacher with the same
vocabulary; `--model` / `--teacher` take local folders instead. The data are synthetic token runs
(next token = current + 1), learnable in a few steps.

On CPU (2 processes, gloo; `accelerate launch --cpu` starts only one process, so set ACCELERATE_USE_CPU=1):

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \
        examples/accelerate/distill_prune_qat.py --tiny --output_dir /tmp/dpq

On 2 GPUs (keep NVLink multicast off, see README.md):

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/accelerate/distill_prune_qat.py
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/accelerate/distill_prune_qat.py
    accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml examples/accelerate/distill_prune_qat.py
    # add --peft for the LoRA student
"""

from __future__ import annotations

import argparse
import json
import os
import zlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainerCallback

from hf_compress import (
    DistillationConfig,
    DistillationTrainer,
    PruningCallback,
    PruningConfig,
    QATCallback,
    prune_,
    sparsity_report,
)
from hf_compress.utils.sharding import single_process_loading
from hf_compress.utils.threads import configure_threads

# Sizes built from a config when no --model / --teacher is given.
SIZES = {
    # student ~0.1B, teacher ~0.6B parameters (fp32 teacher: ~2.4 GB per rank under DDP)
    "default": {
        "vocab": 32000,
        "student": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=12, intermediate_size=2048),
        "teacher": dict(hidden_size=1536, num_hidden_layers=16, num_attention_heads=12, intermediate_size=4096),
    },
    # student ~19M, teacher ~50M: the GPU correctness matrix (run_2gpu.sh), where import and setup dominate
    "small": {
        "vocab": 32000,
        "student": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=704),
        "teacher": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1408),
    },
    "tiny": {
        "vocab": 96,
        "student": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        "teacher": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128),
    },
}


# ---------------------------------------------------------------------------------------------- helpers
def is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather(obj):
    """Every rank's `obj`, in rank order (a list of one element without torch.distributed)."""
    if not is_dist():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter on this rank: a DTensor (FSDP2) is gathered, a ZeRO-3 partition too.

    Collective under FSDP2 / ZeRO-3: every rank must call it for the same parameters in the same order.
    """
    from hf_compress.utils.sharding import full_tensor as gather_whole

    return gather_whole(param).detach()


def zero3_master_violations(param: torch.Tensor, local_mask: torch.Tensor) -> int:
    """Under ZeRO-3, pruned positions whose fp32 master weight (this rank's optimizer partition) is not zero: the
    optimizer steps from these, so a pruned weight kept alive there would come back. 0 for other parameters."""
    if not hasattr(param, "ds_id") or getattr(param, "_z3_optimizer", None) is None or not param.requires_grad:
        return 0
    from deepspeed.utils import safe_get_local_fp32_param

    master = safe_get_local_fp32_param(param)
    return int((master[~local_mask.to(master.device)] != 0).sum())


def local_param_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes held on this rank, bytes of the whole model) of `module`'s parameters."""
    local = full = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition; ds_numel is the logical size
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


def build_model(size: str, role: str, vocab: int, seed: int, device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """A Llama with random weights, initialised directly on `device` (on a GPU: no slow CPU initialisation)."""
    torch.manual_seed(seed)
    spec = dict(SIZES[size][role])
    spec.setdefault("num_key_value_heads", spec["num_attention_heads"] // 2 or 1)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False, **spec)
    with torch.device(device):
        return LlamaForCausalLM(config)


class RunDataset(torch.utils.data.Dataset):
    """Synthetic causal-LM rows: runs of consecutive token ids from a random start (next = current + 1 mod V)."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, vocab, (n,), generator=g)
        self.seq_len, self.vocab = seq_len, vocab

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        ids = (torch.arange(self.seq_len) + self.starts[i]) % self.vocab
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def mask_checksum(masks: dict[str, torch.Tensor]) -> int:
    crc = 0
    for name in sorted(masks):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(masks[name].to(torch.uint8).cpu().numpy().tobytes(), crc)
    return crc


# ---------------------------------------------------------------------------------------------- mask check
class MaskConsistencyCallback(TrainerCallback):
    """After every optimizer step: gather each rank's pruning-mask checksum, sparsity, pruned-but-nonzero count and
    a checksum of the pruned layers' weights, and fail unless the ranks agree and every pruned weight is zero.

    Must be added after the `PruningCallback` so it sees the masks that callback applied in this step.
    """

    def __init__(self, pruning: PruningCallback):
        self.pruning = pruning
        self.records: list[dict] = []

    def _check(self, model, step: int) -> None:
        from hf_compress.utils import unwrap_model
        from hf_compress.utils.sharding import unshard_like

        masks = self.pruning.masks
        base = unwrap_model(model)  # mask names are relative to it (a PeftModel keeps its `base_model.model.` prefix)
        violations, weight_crc, whole_masks, master_violations = 0, 0, {}, 0
        for name in sorted(masks):
            # The live module (QAT fake quantization keeps the same module object and weight).
            module = base.get_submodule(name) if name else base
            weight = getattr(module, "base_layer", module).weight
            # The mask is laid out like the weight (DTensor shard / ZeRO-3 partition): both are gathered whole.
            mask = whole_masks[name] = unshard_like(masks[name], weight).cpu()
            weight = full_tensor(weight).float().cpu()
            violations += int((weight[~mask] != 0).sum())
            weight_crc = zlib.crc32(weight.numpy().tobytes(), weight_crc)
            master_violations += zero3_master_violations(getattr(module, "base_layer", module).weight, masks[name])
        local = {
            "rank": int(os.environ.get("RANK", 0)),
            "mask_crc": mask_checksum(whole_masks),
            "sparsity": round(self.pruning.sparsity, 6),
            "violations": violations,
            "master_violations": master_violations,
            "weight_crc": weight_crc,
        }
        ranks = gather(local)
        record = {
            "step": step,
            "masks_identical": len({r["mask_crc"] for r in ranks}) == 1,
            "weights_identical": len({r["weight_crc"] for r in ranks}) == 1,
            "violations": [r["violations"] for r in ranks],
            "master_violations": [r["master_violations"] for r in ranks],
            "sparsity": [r["sparsity"] for r in ranks],
        }
        self.records.append(record)
        if not record["masks_identical"] or any(record["violations"]) or any(record["master_violations"]):
            raise RuntimeError(f"pruning masks do not hold at step {step}: {ranks}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._check(model, state.global_step)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local folder of the student (default: built from a Llama config)")
    p.add_argument("--teacher", help="local folder of the teacher (default: built from a Llama config)")
    p.add_argument("--tiny", action="store_true", help="tiny models and few steps (CPU tests)")
    p.add_argument("--offline", action="store_true", help="alias of --tiny")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="model sizes (default: 'default', or 'tiny')")
    p.add_argument(
        "--data_vocab",
        type=int,
        default=1024,
        help="the token runs use the first N ids of the vocabulary (default 1024): a loss that visibly falls in a few "
        "dozen steps even with a 32k vocabulary",
    )
    p.add_argument("--peft", action="store_true", help="LoRA student on a base pruned once before training")
    p.add_argument("--output_dir", default="out/distill_prune_qat")
    p.add_argument("--max_steps", type=int, default=None, help="default: 8 with --tiny, 60 otherwise")
    p.add_argument("--batch_size", type=int, default=None, help="per device; default 4 (tiny) / 8")
    p.add_argument("--seq_len", type=int, default=None, help="default 16 (tiny) / 256")
    p.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="default 1e-2 (tiny; 3e-2 with --peft) / 3e-4 (3e-3 with --peft)",
    )
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity (ignored with --pattern N:M)")
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or 'N:M' such as '2:4'")
    p.add_argument(
        "--method", default="magnitude", help="pruning scores: 'magnitude' or 'wanda' (4 calibration batches)"
    )
    p.add_argument("--no_qat", action="store_true", help="leave QATCallback out (to isolate a failure)")
    p.add_argument("--no_pruning", action="store_true", help="leave PruningCallback out (to isolate a failure)")
    p.add_argument("--qat_scheme", default="int8-dynamic-activation-int4-weight")
    p.add_argument("--qat_group_size", type=int, default=32)
    p.add_argument("--qat_start_step", type=int, default=None, help="default: max_steps // 2")
    p.add_argument("--teacher_dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--results_json", default=None, help="default: <output_dir>/results.json (and $OUT if set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 on small or busy machines, see hf_compress.utils.threads)",
    )
    args = p.parse_args(argv)
    args.tiny = args.tiny or args.offline
    tiny = args.tiny
    args.max_steps = args.max_steps or (8 if tiny else 60)
    args.batch_size = args.batch_size or (4 if tiny else 8)
    args.seq_len = args.seq_len or (16 if tiny else 256)
    args.learning_rate = args.learning_rate or (
        (3e-2 if args.peft else 1e-2) if tiny else (3e-3 if args.peft else 3e-4)
    )
    if args.qat_start_step is None:
        args.qat_start_step = args.max_steps // 2
    return args


def load_models(args, device_is_cuda: bool):
    size = args.size or ("tiny" if args.tiny else "default")
    if args.teacher_dtype == "auto":
        teacher_dtype = torch.bfloat16 if device_is_cuda else torch.float32
    else:
        teacher_dtype = getattr(torch, args.teacher_dtype)
    vocab = SIZES[size]["vocab"]
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device_is_cuda else "cpu"
    if args.model:
        student = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        vocab = student.config.vocab_size
    else:
        student = build_model(size, "student", vocab, seed=args.seed + 1, device=device)
    if args.teacher:
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=teacher_dtype)
    else:
        teacher = build_model(size, "teacher", vocab, seed=args.seed + 2, device=device).to(teacher_dtype)
    return student, teacher, vocab


def main(argv=None):
    args = parse_args(argv)
    configure_threads(args.num_threads)
    cuda = torch.cuda.is_available()
    out = Path(args.output_dir)
    student, teacher, vocab = load_models(args, cuda)
    data_vocab = min(vocab, args.data_vocab)
    teacher_full_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())

    prune_config = PruningConfig(
        sparsity=None if args.pattern != "unstructured" else args.sparsity,
        pattern=args.pattern,
        method=args.method,
        num_calibration_batches=4,
        schedule="oneshot" if args.peft else "linear",
        start_step=0,
        end_step=None if args.peft else max(1, args.max_steps // 2),
        frequency=max(1, args.max_steps // 4),
    )
    calibration = None
    if prune_config.requires_calibration:  # Wanda: the same 4 batches on every rank (masks come from rank 0 anyway)
        rows = RunDataset(4 * args.batch_size, args.seq_len, data_vocab, seed=args.seed + 7)
        calibration = [
            {"input_ids": torch.stack([rows[b * args.batch_size + i]["input_ids"] for i in range(args.batch_size)])}
            for b in range(4)
        ]
    base_dir = out / "student_base"
    rank = int(os.environ.get("RANK", 0))
    if args.peft:
        from peft import LoraConfig, get_peft_model

        # The frozen base is pruned once, here, and saved, so the adapter checkpoint points at a pruned base that
        # stock from_pretrained can load; PruningCallback recomputes the same masks and keeps them.
        prune_(student, prune_config, calibration_data=calibration)
        if rank == 0:
            student.save_pretrained(base_dir)
        student = get_peft_model(
            student,
            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]),
        )
        # adapter_config.json must name the pruned base for from_pretrained to find it
        student.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())

    training_args = DistillationConfig(
        output_dir=str(out / "run"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        bf16=cuda,
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=True,
        alpha=0.5,
        temperature=2.0,
        dataloader_drop_last=True,
    )
    pruning = PruningCallback(prune_config, calibration_data=calibration)
    qat = QATCallback(
        scheme=args.qat_scheme,
        group_size=args.qat_group_size,
        start_step=args.qat_start_step,
        output_dir=str(out / "quantized"),
        overwrite=True,
        # A LoRA student is merged (on a copy) before quantizing; sharded students are gathered on rank 0 first.
        save_quantized=not args.no_qat,
    )
    mask_check = MaskConsistencyCallback(pruning)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=RunDataset(args.batch_size * args.max_steps * 8, args.seq_len, data_vocab, seed=args.seed),
        callbacks=([] if args.no_pruning else [pruning])
        + ([] if args.no_qat else [qat])
        + ([] if args.no_pruning else [mask_check]),
    )
    world_size = trainer.accelerator.num_processes
    distributed_type = str(trainer.accelerator.distributed_type).split(".")[-1]
    if getattr(trainer.accelerator, "is_fsdp2", False):
        distributed_type = "FSDP2"

    # Teacher placement, before any training step.
    t_local, t_full = local_param_bytes(trainer.teacher_model)
    memory = {
        "rank": rank,
        "teacher_local_param_bytes": t_local,
        "teacher_full_param_bytes": t_full or teacher_full_bytes,
        "teacher_type": type(trainer.teacher_model).__name__,
    }
    if cuda:
        torch.cuda.synchronize()
        memory["cuda_allocated_after_setup"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    trainer.train()
    from hf_compress.quantization.qat import convert_qat_, fake_quantized_module_names

    left_fake_quantized = len(fake_quantized_module_names(trainer.model))
    if left_fake_quantized:
        # QATCallback(save_quantized=False) returns from on_train_end before removing fake quantization (its
        # docstring says it is removed): remove it here so the model matches what save_model writes.
        convert_qat_(trainer.model)
    if cuda:
        memory["cuda_max_allocated_train"] = torch.cuda.max_memory_allocated()
    memory_all = gather(memory)

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    k = max(1, len(losses) // 4)
    loss_first, loss_last = sum(losses[:k]) / k, sum(losses[-k:]) / k

    # Final checkpoint: gathered by the Trainer (FSDP2 full state dict / ZeRO-3 16-bit weights) and saved by rank 0.
    final_dir = out / "final"
    trainer.save_model(str(final_dir))
    probe = RunDataset(2, args.seq_len, data_vocab, seed=1234)
    probe_ids = torch.stack([probe[i]["input_ids"] for i in range(2)])
    # Reference logits of the trained model, computed on every rank (a collective forward under FSDP2 / ZeRO-3).
    model = trainer.model_wrapped if distributed_type == "DEEPSPEED" else trainer.model
    model.eval()
    with torch.no_grad():
        ref_logits = model(input_ids=probe_ids.to(trainer.args.device)).logits.float().cpu()

    failures: list[str] = []
    results: dict = {}
    if rank == 0:
        # Loaded and run by this process alone (under ZeRO-3 from_pretrained would otherwise be a collective).
        with single_process_loading(), torch.no_grad():
            reloaded = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32).eval()
            logits = reloaded(input_ids=probe_ids).logits.float()
        diff = (logits - ref_logits).abs().max().item()
        scale = ref_logits.abs().max().item()
        # CPU runs are fp32 end to end; GPU runs compute the reference under bf16 mixed precision.
        tolerance = 1e-4 * max(1.0, scale) if not cuda else 3e-2 * max(1.0, scale)
        reload = {
            "dir": str(final_dir),
            "class": type(reloaded).__name__,
            "max_abs_logit_diff": diff,
            "max_abs_logit": scale,
            "tolerance": tolerance,
            "equal": diff <= tolerance,
        }
        report = sparsity_report(reloaded, pattern=None if args.pattern == "unstructured" else args.pattern)
        reload["target_sparsity"] = round(report["target_sparsity"], 6)
        reload["n_m_compliant"] = report["n_m_compliant"]
        quant = None
        qdir = out / "quantized"
        if qat.save_quantized and qdir.is_dir():
            with single_process_loading(), torch.no_grad():
                qmodel = AutoModelForCausalLM.from_pretrained(qdir, device_map="cpu")
                qlogits = qmodel(input_ids=probe_ids).logits.float()
            quant = {
                "dir": str(qdir),
                "finite": bool(torch.isfinite(qlogits).all()),
                "max_abs_logit_diff_vs_float": (qlogits - ref_logits).abs().max().item(),
                "argmax_agreement": (qlogits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
            }
        results = {
            "world_size": world_size,
            "distributed_type": distributed_type,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "peft": args.peft,
            "max_steps": args.max_steps,
            "global_step": trainer.state.global_step,
            "losses": losses,
            "loss_first": loss_first,
            "loss_last": loss_last,
            "loss_decreased": loss_last < loss_first,
            "qat_inserted_at": qat.fake_quant_inserted_at,
            "qat_layers": len(qat.fake_quantized_modules),
            "fake_quantized_layers_left_after_train": left_fake_quantized,
            "mask_checks": mask_check.records,
            "pruning": not args.no_pruning,
            "qat": not args.no_qat,
            "masks_identical_every_step": args.no_pruning
            or bool(mask_check.records)
            and all(
                r["masks_identical"] and not any(r["violations"]) and not any(r["master_violations"])
                for r in mask_check.records
            ),
            "final_sparsity": pruning.sparsity,
            "teacher_memory": memory_all,
            "reload": reload,
            "quantized_reload": quant,
        }
        if not results["loss_decreased"]:
            failures.append(f"loss did not go down: {loss_first:.4f} -> {loss_last:.4f}")
        if not results["masks_identical_every_step"]:
            failures.append("pruning masks differed between ranks or did not hold")
        if not args.no_pruning and len(mask_check.records) != trainer.state.global_step:
            failures.append(f"masks checked at {len(mask_check.records)} of {trainer.state.global_step} steps")
        if reload["n_m_compliant"] is False:
            failures.append(f"reloaded checkpoint is not {args.pattern} sparse")
        if not reload["equal"]:
            failures.append(f"reloaded checkpoint logits differ by {diff:.3g} (tolerance {tolerance:.3g})")
        if quant is not None and not quant["finite"]:
            failures.append("quantized model gives non-finite logits")
        results["failures"] = failures
        print_summary(results)
        text = json.dumps(results, indent=1)
        path = Path(args.results_json) if args.results_json else out / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if os.environ.get("OUT"):
            tag = f"{distributed_type.lower()}{'_peft' if args.peft else ''}_n{world_size}"
            Path(os.environ["OUT"], f"accelerate_{tag}.json").write_text(text)
        print("RESULT_JSON " + json.dumps(results))
    failures = gather(failures)[0]
    if is_dist():
        torch.distributed.barrier()
    if failures:
        raise SystemExit("FAILED: " + "; ".join(failures))


def print_summary(r: dict) -> None:
    mib = 2**20
    print(f"\n## {r['distributed_type']} x{r['world_size']} on {r['device']}{' (LoRA student)' if r['peft'] else ''}")
    print(f"loss {r['loss_first']:.4f} -> {r['loss_last']:.4f} over {r['global_step']} steps")
    if r["pruning"]:
        print(
            f"pruning: final sparsity {r['final_sparsity']:.3f}; masks identical and held on every rank at "
            f"{len(r['mask_checks'])} steps: {r['masks_identical_every_step']}"
        )
    else:
        print("pruning: off (--no_pruning)")
    if r["qat"]:
        print(f"QAT: fake quantization inserted at step {r['qat_inserted_at']} on {r['qat_layers']} layers")
    else:
        print("QAT: off (--no_qat)")
    print("| rank | teacher | teacher params held (MiB) | of full (MiB) | CUDA after setup (MiB) | CUDA peak (MiB) |")
    print("|---|---|---|---|---|---|")
    for m in r["teacher_memory"]:
        cuda_a = m.get("cuda_allocated_after_setup")
        cuda_p = m.get("cuda_max_allocated_train")
        print(
            f"| {m['rank']} | {m['teacher_type']} | {m['teacher_local_param_bytes'] / mib:.2f} | "
            f"{m['teacher_full_param_bytes'] / mib:.2f} | {'-' if cuda_a is None else f'{cuda_a / mib:.0f}'} | "
            f"{'-' if cuda_p is None else f'{cuda_p / mib:.0f}'} |"
        )
    rl = r["reload"]
    print(
        f"reload {rl['dir']} with {rl['class']}.from_pretrained: max |logit diff| {rl['max_abs_logit_diff']:.3g} "
        f"(tolerance {rl['tolerance']:.3g}) -> {'equal' if rl['equal'] else 'DIFFERENT'}; "
        f"sparsity {rl['target_sparsity']:.3f}"
    )
    if r["quantized_reload"]:
        q = r["quantized_reload"]
        print(
            f"quantized model {q['dir']}: finite {q['finite']}, argmax agreement with float {q['argmax_agreement']:.3f}"
        )
    print("checks:", "all passed" if not r["failures"] else "; ".join(r["failures"]))


if __name__ == "__main__":
    main()
    if is_dist():
        # Every rank, after its last collective: a process exiting with its gloo/NCCL group alive can abort at
        # interpreter shutdown ("terminate called without an active exception", pytorch/pytorch#190489).
        torch.distributed.destroy_process_group()
