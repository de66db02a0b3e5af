"""Shared helpers of the GPU benchmarks: the ~0.7B model built from a config, timing, Markdown and JSON output.

Every script measures its variants side by side in one process: timings are interleaved round by round (the order
alternates) and medians are reported; CUDA work is synchronized around each timed call.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

# ~0.68B parameters (Qwen2-0.5B-like layout: 24 layers, GQA with 2 KV heads, untied 32k vocabulary).
GPU_MODEL = dict(
    vocab_size=32000,
    hidden_size=1536,
    num_hidden_layers=24,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=4096,
)
# A few kB: what --smoke builds on CPU. Widths are multiples of 64 so 2:4 / group-size constraints hold.
SMOKE_MODEL = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
)

NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _key, _value in NVLINK_MULTICAST_OFF.items():
    os.environ.setdefault(_key, _value)


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    if has_cuda():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def build_causal_lm(spec: dict, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A Qwen2 causal LM with random weights from `spec` (no download)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(max_position_embeddings=2048, tie_word_embeddings=False, use_cache=False, **spec)
    return Qwen2ForCausalLM(config).to(dtype)


def save_causal_lm(spec: dict, folder: str | os.PathLike | None = None, dtype=torch.bfloat16, seed: int = 0) -> str:
    """Build the model from `spec` and save it (safetensors) to `folder` (a new temporary folder by default)."""
    folder = str(folder or tempfile.mkdtemp(prefix="hf_compress_gpu_bench_"))
    model = build_causal_lm(spec, seed=seed, dtype=dtype)
    model.save_pretrained(folder)
    del model
    return folder


def num_parameters(spec: dict) -> int:
    """Parameter count of the model `spec` builds (on the meta device: no memory)."""
    with torch.device("meta"):
        model = build_causal_lm(spec)
    return sum(p.numel() for p in model.parameters())


def sync() -> None:
    if has_cuda():
        torch.cuda.synchronize()


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds of each function, timed round by round in alternating order (load hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(warmup + rounds):
        for name in names if i % 2 == 0 else reversed(names):
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        return "-" if x is None else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> dict:
    import transformers

    info = {
        "device": device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


def write_json(name: str, payload: dict, path: str | None = None) -> list[str]:
    """Write `payload` to `path` and, if `$OUT` is set, to `$OUT/<name>.json`; returns the paths written."""
    text = json.dumps(payload, indent=1, default=str)
    written = []
    targets = [path] if path else []
    if os.environ.get("OUT"):
        targets.append(os.path.join(os.environ["OUT"], f"{name}.json"))
    for target in targets:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text)
        written.append(target)
    return written


def skip(message: str) -> None:
    print(f"SKIPPED: {message}")
