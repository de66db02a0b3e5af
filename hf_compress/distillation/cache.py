"""Offline distillation: run a teacher once over a tokenized dataset and keep compact targets on disk.

`cache_teacher_logits` writes, next to the dataset's own columns, per-token (causal LM, token classification) or
per-example (sequence classification) teacher targets as columns of a `datasets.Dataset` (`save_to_disk`), which
`DistillationTrainer(teacher_model=None)` trains from without a teacher:

- `method="topk"`: the k most probable tokens at the training temperature, their probabilities and the remaining
  mass on every other token (the losses use the (k + 1)-bin distribution; exact when k is the vocabulary size).
- `method="sampled"` (Anshumann et al., ACL 2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in
  LLMs"): k tokens drawn with replacement from the teacher's distribution at the training temperature, stored as
  unique ids with counts (probability = count / k), so that the forward-KL gradient is unbiased.

The work is split into shards of rows, each saved as soon as it is done and listed in a manifest, so an interrupted
run resumes without recomputing (or trusting unverified) finished shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

METHODS = ("topk", "sampled")
PROBABILITY_DTYPES = ("float16", "float32")
_TASKS = ("auto", "sequence-classification", "causal-lm", "token-classification")

COLUMN_IDS = "teacher_token_ids"
COLUMN_PROBS = "teacher_token_probs"  # topk: probabilities (fp16 by default)
COLUMN_COUNTS = "teacher_token_counts"  # sampled: draws per unique id (probability = count / k)
COLUMN_NUM_ENTRIES = "teacher_num_entries"  # sampled: unique ids per position
COLUMN_REST = "teacher_rest_mass"  # topk with k < vocabulary: mass on every other token
COLUMN_NEG_ENTROPY = "teacher_neg_entropy"  # sampled: sum p log p of the full teacher distribution
COLUMN_HASH = "teacher_input_hash"  # per example: hash of its input_ids (lengths and token ids)
COLUMN_CONFIG = "teacher_cache_config"  # per example: the CachedTargetsSpec as JSON
CACHE_COLUMNS = (
    COLUMN_IDS,
    COLUMN_PROBS,
    COLUMN_COUNTS,
    COLUMN_NUM_ENTRIES,
    COLUMN_REST,
    COLUMN_NEG_ENTROPY,
    COLUMN_HASH,
    COLUMN_CONFIG,
)
MANIFEST_FILE = "teacher_cache_manifest.json"
SHARDS_DIR = "teacher_cache_shards"
_FORMAT = "hf_compress.teacher_cache"
_VERSION = 1


@dataclass(frozen=True)
class CachedTargetsSpec:
    """What a cache holds: stored in every row (`teacher_cache_config`) so a dataset describes its own targets.

    Args:
        method (`str`): `topk` or `sampled`.
        k (`int`): tokens kept per position (`topk`) or draws per position (`sampled`).
        temperature (`float`): the temperature the teacher's distribution was taken at.
        vocab_size (`int`): width of the teacher distribution (vocabulary, or classes).
        task (`str`): `causal-lm`, `token-classification` (one target per token) or `sequence-classification`.
        rest (`bool`): whether a rest-mass column is stored (`topk` with k below the vocabulary size).
        probability_dtype (`str`): `float16` or `float32` (`topk` probabilities).
    """

    method: str
    k: int
    temperature: float
    vocab_size: int
    task: str
    rest: bool
    probability_dtype: str = "float16"
    version: int = _VERSION

    @property
    def per_position(self) -> bool:
        return self.task != "sequence-classification"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> CachedTargetsSpec:
        try:
            values = json.loads(text)
            spec = cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{COLUMN_CONFIG}={text!r} is not a teacher-cache description ({err}).") from None
        if spec.version != _VERSION:
            raise ValueError(f"the teacher cache has format version {spec.version}; this version reads {_VERSION}.")
        return spec

    def columns(self) -> list[str]:
        """The per-example columns of this cache."""
        if self.method == "topk":
            cols = [COLUMN_IDS, COLUMN_PROBS] + ([COLUMN_REST] if self.rest else [])
        else:
            cols = [COLUMN_IDS, COLUMN_COUNTS, COLUMN_NUM_ENTRIES, COLUMN_NEG_ENTROPY]
        return cols + [COLUMN_HASH, COLUMN_CONFIG]


@dataclass
class CachedTeacherLogits:
    """What `cache_teacher_logits` made.

    Args:
        path (`str`): the folder, loadable with `datasets.load_from_disk`.
        dataset (`datasets.Dataset`): the input dataset's columns plus the teacher targets.
        spec (`CachedTargetsSpec`): method, k, temperature, vocabulary, task.
        num_examples (`int`), num_positions (`int`): rows, and targets stored (tokens; one per example for
            sequence classification).
        target_bytes (`int`): bytes of the teacher columns (Arrow buffers, as on disk).
        bytes_per_token (`float`): `target_bytes / num_positions`.
        disk_bytes (`int`): size of the saved dataset files, input columns included.
        seconds (`float`): wall time of this call; teacher_seconds: of the shards computed in this call.
        shards_computed (`int`), shards_reused (`int`): shards run through the teacher now / verified from before.
    """

    path: str
    dataset: Any
    spec: CachedTargetsSpec
    num_examples: int
    num_positions: int
    target_bytes: int
    bytes_per_token: float
    disk_bytes: int
    seconds: float
    teacher_seconds: float
    shards_computed: int
    shards_reused: int


# ----------------------------------------------------------------------------------------------------------- hashing
def input_ids_hash(input_ids: Any) -> int:
    """64-bit hash of one example's token ids (their values and count), as stored in `teacher_input_hash`."""
    array = np.ascontiguousarray(np.asarray(input_ids).reshape(-1), dtype="<i8")
    return int.from_bytes(hashlib.blake2b(array.tobytes(), digest_size=8).digest(), "little", signed=True)


def _list_column(table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, flat values) of a list column of an Arrow table batch."""
    import pyarrow as pa

    column = table.column(name)
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_list(array.type) and not pa.types.is_large_list(array.type):
        raise ValueError(f"column {name!r} must hold one list of token ids per example, got Arrow type {array.type}.")
    offsets = array.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    values = array.values.to_numpy(zero_copy_only=False)
    base = offsets[0]
    values = values[base : offsets[-1]]
    return offsets - base, values


def dataset_input_hashes(dataset, column: str = "input_ids", batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """`(hashes, lengths)` of every example's `input_ids`, in the dataset's order (indices mappings respected)."""
    hashes, lengths = [], []
    view = dataset.with_format("arrow", columns=[column])
    for table in view.iter(batch_size=batch_size):
        offsets, values = _list_column(table, column)
        values = values.astype("<i8", copy=False)
        for i in range(len(offsets) - 1):
            row = values[offsets[i] : offsets[i + 1]]
            hashes.append(
                int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little", signed=True)
            )
        lengths.append(np.diff(offsets))
    return np.asarray(hashes, dtype=np.int64), (np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64))


# ----------------------------------------------------------------------------------------------------- the targets
@torch.no_grad()
def topk_targets(logits: torch.Tensor, k: int, temperature: float, rest: bool):
    """`(ids, probs, rest_mass)` of the k most probable classes of `softmax(logits / T)` (fp32), one row per row."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = log_p.topk(k, dim=-1)
    rest_mass = (-torch.expm1(torch.logsumexp(values, -1))).clamp_min(0.0) if rest else None
    return ids, values.exp(), rest_mass


@torch.no_grad()
def sampled_targets(logits: torch.Tensor, k: int, temperature: float, generator: torch.Generator | None = None):
    """k draws with replacement from `softmax(logits / T)` per row, as unique ids and counts.

    Returns `(ids, counts, num_unique, neg_entropy)`: `ids` and `counts` flat over the rows (row-major, ids sorted
    within a row), `num_unique` per row, and the teacher's sum p log p per row.
    """
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    p = log_p.exp()
    draws = torch.multinomial(p, k, replacement=True, generator=generator).sort(-1).values
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    starts = new.reshape(-1).nonzero().squeeze(-1)
    ends = torch.cat([starts[1:], starts.new_tensor([draws.numel()])])
    return draws.reshape(-1)[starts], ends - starts, new.sum(-1), torch.xlogy(p, p).sum(-1)


# --------------------------------------------------------------------------------------------------------- helpers
def _check_positive_int(name: str, value: Any, upper: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (upper is not None and value > upper):
        bound = f" and <= {upper}" if upper is not None else ""
        raise ValueError(f"{name}={value!r} must be an integer >= 1{bound}.")


def _resolve_teacher(teacher, init_kwargs: dict | None, device) -> tuple[nn.Module, str, torch.device]:
    from .student import _load_teacher

    name = None
    if isinstance(teacher, (str, os.PathLike)):
        name = str(teacher)
        kwargs = dict(init_kwargs or {})
        dtype = kwargs.get("dtype")
        if isinstance(dtype, str) and dtype != "auto":
            kwargs["dtype"] = getattr(torch, dtype)
        teacher = _load_teacher(name, kwargs)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    elif init_kwargs:
        raise ValueError("teacher_model_init_kwargs is only used when the teacher is given as a name or path.")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module or a name/path, got {type(teacher).__name__}.")
    if device is None:
        param = next(teacher.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    if getattr(teacher, "hf_device_map", None) is None and not getattr(teacher, "is_loaded_in_4bit", False):
        teacher.to(device)
    teacher.eval()
    return teacher, name or type(teacher).__name__, device


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _folder_bytes(path: Path) -> int:
    state = path / "state.json"
    if state.is_file():
        files = [path / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    else:
        files = list(path.glob("*.arrow"))
    return sum(f.stat().st_size for f in files if f.is_file())


class _Shard:
    """Accumulates one shard's targets as flat arrays, then builds its Arrow table in one go (no per-row lists)."""

    def __init__(self, spec: CachedTargetsSpec):
        self.spec = spec
        self.positions: list[np.ndarray] = []  # per example
        self.parts: dict[str, list[np.ndarray]] = {}
        self.hashes: list[int] = []

    def add(self, name: str, values: np.ndarray) -> None:
        self.parts.setdefault(name, []).append(values)

    def table(self):
        import pyarrow as pa

        spec = self.spec
        vocab_type = pa.uint16() if spec.vocab_size <= 1 << 16 else pa.int32()
        count_type = pa.uint8() if spec.k <= 255 else pa.uint16()
        prob_type = pa.float16() if spec.probability_dtype == "float16" else pa.float32()
        positions = np.concatenate(self.positions).astype(np.int64)

        def lists(values: np.ndarray, per_example: np.ndarray, value_type) -> pa.Array:
            offsets = np.zeros(len(per_example) + 1, dtype=np.int64)
            np.cumsum(per_example, out=offsets[1:])
            if offsets[-1] >= 2**31:
                raise ValueError("a shard holds more than 2**31 target entries; use a smaller shard_size.")
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=value_type))

        def cat(name: str, dtype) -> np.ndarray:
            return np.concatenate(self.parts[name]).astype(dtype, copy=False)

        columns: dict[str, pa.Array] = {}
        if spec.method == "topk":
            columns[COLUMN_IDS] = lists(cat("ids", vocab_type.to_pandas_dtype()), positions * spec.k, vocab_type)
            columns[COLUMN_PROBS] = lists(cat("probs", prob_type.to_pandas_dtype()), positions * spec.k, prob_type)
            if spec.rest:
                columns[COLUMN_REST] = lists(cat("rest", prob_type.to_pandas_dtype()), positions, prob_type)
        else:
            num_unique = cat("num_unique", np.int64)
            bounds = np.zeros(len(positions) + 1, dtype=np.int64)
            np.cumsum(positions, out=bounds[1:])
            entry_bounds = np.zeros(len(num_unique) + 1, dtype=np.int64)
            np.cumsum(num_unique, out=entry_bounds[1:])
            entries_per_example = np.diff(entry_bounds[bounds])
            columns[COLUMN_IDS] = lists(cat("ids", vocab_type.to_pandas_dtype()), entries_per_example, vocab_type)
            columns[COLUMN_COUNTS] = lists(
                cat("counts", count_type.to_pandas_dtype()), entries_per_example, count_type
            )
            columns[COLUMN_NUM_ENTRIES] = lists(num_unique.astype(count_type.to_pandas_dtype()), positions, count_type)
            columns[COLUMN_NEG_ENTROPY] = lists(cat("neg_entropy", np.float16), positions, pa.float16())
        columns[COLUMN_HASH] = pa.array(np.asarray(self.hashes, dtype=np.int64))
        columns[COLUMN_CONFIG] = pa.array([spec.to_json()] * len(positions), type=pa.string())
        return pa.table(columns)


def _teacher_batch(table, device, pad_id: int) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Right-padded teacher inputs of an Arrow batch, and each example's length."""
    offsets, values = _list_column(table, "input_ids")
    lengths = np.diff(offsets)
    width = int(lengths.max())
    rows = len(lengths)
    position = np.arange(width)[None, :] < lengths[:, None]
    ids = np.full((rows, width), pad_id, dtype=np.int64)
    ids[position] = values
    inputs = {"input_ids": torch.from_numpy(ids)}
    if "attention_mask" in table.column_names:
        m_offsets, m_values = _list_column(table, "attention_mask")
        mask = np.zeros((rows, width), dtype=np.int64)
        mask[position] = m_values
    else:
        mask = position.astype(np.int64)
    inputs["attention_mask"] = torch.from_numpy(mask)
    if "token_type_ids" in table.column_names:
        _, t_values = _list_column(table, "token_type_ids")
        types = np.zeros((rows, width), dtype=np.int64)
        types[position] = t_values
        inputs["token_type_ids"] = torch.from_numpy(types)
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}, lengths


def _load_verified_shard(path: Path, rows: tuple[int, int], hashes: np.ndarray, spec: CachedTargetsSpec):
    """The shard dataset if it loads and matches the dataset rows it claims; else the reason it does not."""
    from datasets import load_from_disk

    if not path.is_dir():
        return None, "missing"
    try:
        shard = load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - any unreadable shard is recomputed
        return None, f"unreadable ({type(err).__name__}: {err})"
    start, end = rows
    if len(shard) != end - start:
        return None, f"holds {len(shard)} rows, expected {end - start}"
    if set(shard.column_names) != set(spec.columns()):
        return None, f"has columns {sorted(shard.column_names)}, expected {sorted(spec.columns())}"
    stored = np.asarray(shard.with_format("numpy", columns=[COLUMN_HASH])[COLUMN_HASH], dtype=np.int64)
    if not np.array_equal(stored, hashes[start:end]):
        return None, "its input hashes differ from the dataset's rows (the dataset changed)"
    if shard.unique(COLUMN_CONFIG) != [spec.to_json()]:
        return None, "it was made with other settings"
    return shard, None


# ------------------------------------------------------------------------------------------------------ the verb
def cache_teacher_logits(
    teacher: nn.Module | str | os.PathLike,
    dataset,
    output_dir: str | os.PathLike,
    *,
    method: str = "topk",
    top_k: int | None = None,
    num_samples: int | None = None,
    temperature: float = 2.0,
    batch_size: int = 8,
    shard_size: int = 1000,
    task: str = "auto",
    vocab_size: int | None = None,
    device: str | torch.device | None = None,
    teacher_model_init_kwargs: dict[str, Any] | None = None,
    probability_dtype: str = "float16",
    seed: int = 0,
    overwrite: bool = False,
    keep_shards: bool = False,
    progress: bool = True,
) -> CachedTeacherLogits:
    r"""
    Run `teacher` once over a tokenized `dataset` and save the dataset with compact teacher targets to `output_dir`.

    The result loads with `datasets.load_from_disk(output_dir)` and trains with
    `DistillationTrainer(model=student, teacher_model=None, train_dataset=...)`, which checks before training that
    the targets match the rows (lengths, token ids), the student's vocabulary and `DistillationConfig.temperature`.
    Rows are processed in shards of `shard_size`, each saved and recorded in `teacher_cache_manifest.json` when done:
    calling again with the same arguments after an interruption verifies the finished shards (row count, input
    hashes, settings) and computes only the others. Softmax and temperature are computed in fp32.

    Args:
        teacher (`nn.Module` or `str`): the teacher, or a name/path loaded with the class in its config (on
            `device`, with `teacher_model_init_kwargs`, e.g. `{"dtype": "bfloat16"}`).
        dataset (`datasets.Dataset`): tokenized rows with `input_ids` (optionally `attention_mask`,
            `token_type_ids`); examples may have different lengths (padded per batch, padding never stored).
        output_dir (`str`): where the dataset is saved (the shards and manifest live there too).
        method (`str`, *optional*, defaults to `"topk"`): `topk` (k most probable tokens + the rest mass) or
            `sampled` (k draws with replacement from the teacher's distribution, stored as unique ids with counts;
            Anshumann et al., ACL 2025): the expected forward-KL gradient then equals full distillation's.
        top_k (`int`, *optional*): tokens kept per position for `topk` (default 64, at most the vocabulary size;
            equal to it stores the full distribution).
        num_samples (`int`, *optional*): draws per position for `sampled` (default 64, at most 65535).
        temperature (`float`, *optional*, defaults to `2.0`): the temperature training will use (checked then).
        batch_size (`int`, *optional*, defaults to `8`): examples per teacher forward.
        shard_size (`int`, *optional*, defaults to `1000`): examples per shard (the unit of resumption).
        task (`str`, *optional*, defaults to `"auto"`): `causal-lm` / `token-classification` (a target per token)
            or `sequence-classification` (per example); `auto` infers it from the teacher's class.
        vocab_size (`int`, *optional*): keep only the first `vocab_size` logits (e.g. the tokenizer's length when
            the teacher's embedding matrix is padded). Defaults to the teacher's output width.
        device (`str` or `torch.device`, *optional*): where the teacher runs; defaults to where a module already is,
            and to CUDA (if any) for a teacher loaded from a path.
        probability_dtype (`str`, *optional*, defaults to `"float16"`): storage of `topk` probabilities (`float32`
            keeps them exact, at twice the size).
        seed (`int`, *optional*, defaults to `0`): seed of the `sampled` draws (one generator per shard, so a
            resumed run draws what an uninterrupted one would have).
        overwrite (`bool`, *optional*, defaults to `False`): discard a cache in `output_dir` made with other
            settings instead of raising.
        keep_shards (`bool`, *optional*, defaults to `False`): keep the shard folders after the final dataset is
            written (they duplicate the targets on disk).
        progress (`bool`, *optional*, defaults to `True`): show a tqdm progress bar.

    Returns:
        [`CachedTeacherLogits`]: the dataset, the bytes per token of the targets, timings and shard counts.

    >>> from hf_compress import cache_teacher_logits
    >>> cache = cache_teacher_logits(teacher, train, "wikitext_topk64", method="topk", top_k=64,
    ...                              temperature=1.0, batch_size=16)  # doctest: +SKIP
    >>> cache.bytes_per_token  # doctest: +SKIP
    258.0
    """
    import datasets
    from tqdm.auto import tqdm

    from .trainer import _output_width, infer_task

    started = time.perf_counter()
    # ---- arguments, before any work
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed: {list(METHODS)}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be a number > 0.")
    if not math.isfinite(float(temperature)):
        raise ValueError(f"temperature={temperature!r} must be finite.")
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("shard_size", shard_size)
    if method == "topk" and num_samples is not None:
        raise ValueError(f"num_samples={num_samples!r} is for method='sampled'; method='topk' takes top_k.")
    if method == "sampled" and top_k is not None:
        raise ValueError(f"top_k={top_k!r} is for method='topk'; method='sampled' takes num_samples.")
    if num_samples is not None:
        _check_positive_int("num_samples", num_samples, 65535)
    if top_k is not None:
        _check_positive_int("top_k", top_k)
    if probability_dtype not in PROBABILITY_DTYPES:
        raise ValueError(
            f"probability_dtype={probability_dtype!r} is not supported; allowed: {list(PROBABILITY_DTYPES)}."
        )
    if task not in _TASKS:
        raise ValueError(f"task={task!r} is not supported; allowed: {list(_TASKS)}.")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset of tokenized rows, got {type(dataset).__name__}.")
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"dataset has no 'input_ids' column (columns: {dataset.column_names}); tokenize it first.")
    if len(dataset) == 0:
        raise ValueError("dataset is empty.")
    if vocab_size is not None:
        _check_positive_int("vocab_size", vocab_size)
    output = Path(output_dir)
    inside = [f["filename"] for f in dataset.cache_files if output.resolve() in Path(f["filename"]).resolve().parents]
    if inside:
        raise ValueError(
            f"dataset is read from output_dir={str(output)!r} ({inside[0]}); write the cache to another folder."
        )

    teacher, teacher_name, device = _resolve_teacher(teacher, teacher_model_init_kwargs, device)
    task = infer_task(teacher) if task == "auto" else task
    width = _output_width(teacher, task)
    if width is None and vocab_size is None:
        raise ValueError("cannot tell the teacher's output width from its config; pass vocab_size.")
    if vocab_size is not None and width is not None and vocab_size > width:
        raise ValueError(f"vocab_size={vocab_size} exceeds the teacher's {width} output logits.")
    vocab = vocab_size or width
    if method == "topk":
        k = min(64, vocab) if top_k is None else top_k
        if k > vocab:
            raise ValueError(f"top_k={k} exceeds the teacher's vocabulary of {vocab}; at most {vocab} (all tokens).")
    else:
        k = 64 if num_samples is None else num_samples
    spec = CachedTargetsSpec(
        method=method,
        k=int(k),
        temperature=float(temperature),
        vocab_size=int(vocab),
        task=task,
        rest=method == "topk" and k < vocab,
        probability_dtype=probability_dtype if method == "topk" else "float16",
    )
    settings = {"num_rows": len(dataset), "shard_size": shard_size, "seed": seed if method == "sampled" else None}

    # ---- the manifest: resume, or start afresh
    shards_dir = output / SHARDS_DIR
    manifest_path = output / MANIFEST_FILE
    hashes, lengths = dataset_input_hashes(dataset)
    manifest = None
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError:
            manifest = None
        if manifest is not None and manifest.get("format") == _FORMAT:
            old = {**manifest.get("spec", {}), **manifest.get("settings", {})}
            new = {**asdict(spec), **settings}
            changed = [key for key in new if old.get(key) != new[key]]
            if changed and not overwrite:
                details = ", ".join(f"{key}={old.get(key)!r} (now {new[key]!r})" for key in changed)
                raise ValueError(
                    f"output_dir={str(output)!r} holds a teacher cache made with {details}; pass overwrite=True to "
                    "replace it, or choose another output_dir."
                )
            if changed:
                manifest = None
        else:
            manifest = None
    if manifest is None:
        if shards_dir.exists():
            shutil.rmtree(shards_dir)
        manifest = {
            "format": _FORMAT,
            "spec": asdict(spec),
            "settings": settings,
            "teacher": teacher_name,
            "shards": {},
            "complete": False,
        }
        output.mkdir(parents=True, exist_ok=True)
        _write_json(manifest_path, manifest)
    elif manifest.get("complete") and (output / "state.json").is_file():
        final = _verified_final(output, hashes, spec)
        if final is not None:
            logger.info("%s: the complete teacher cache matches the dataset; nothing to compute.", output)
            return _result(output, final, spec, started, 0.0, 0, len(manifest["shards"]))
        manifest["complete"] = False

    num_shards = math.ceil(len(dataset) / shard_size)
    done: dict[int, Any] = {}
    for key in list(manifest["shards"]):
        index = int(key)
        rows = (index * shard_size, min(len(dataset), (index + 1) * shard_size))
        if index >= num_shards:
            del manifest["shards"][key]
            continue
        shard, reason = _load_verified_shard(shards_dir / f"shard-{index:05d}", rows, hashes, spec)
        if shard is None:
            logger.warning("teacher cache shard %d fails verification (%s); recomputing it.", index, reason)
            del manifest["shards"][key]
        else:
            done[index] = shard
    reused = len(done)

    # ---- the teacher pass over the unfinished shards
    pad_id = getattr(getattr(teacher, "config", None), "pad_token_id", None) or 0
    extra = {"use_cache": False} if task == "causal-lm" else {}
    chunk_rows = max(1, (1 << (26 if device.type == "cuda" else 20)) // vocab)
    bar = tqdm(
        total=len(dataset),
        initial=sum(len(s) for s in done.values()),
        desc="Caching teacher targets",
        unit="ex",
        disable=not progress,
    )
    teacher_seconds = 0.0
    computed = 0
    input_view = dataset.with_format(
        "arrow", columns=[c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.column_names]
    )
    for index in range(num_shards):
        if index in done:
            continue
        shard_start = time.perf_counter()
        start, end = index * shard_size, min(len(dataset), (index + 1) * shard_size)
        builder = _Shard(spec)
        generator = None
        if method == "sampled":
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
        for batch_start in range(start, end, batch_size):
            table = input_view[batch_start : min(end, batch_start + batch_size)]
            inputs, row_lengths = _teacher_batch(table, device, pad_id)
            with torch.no_grad():
                logits = teacher(**inputs, **extra).logits
            logits = logits[..., :vocab]
            if spec.per_position:  # the rows' real positions, row-major; batch padding is never stored
                steps = torch.arange(inputs["input_ids"].shape[1], device=device)
                rows_logits = logits[steps[None, :] < torch.as_tensor(row_lengths, device=device)[:, None]]
                builder.positions.append(row_lengths)
            else:
                rows_logits = logits.reshape(len(row_lengths), -1)
                builder.positions.append(np.ones(len(row_lengths), dtype=np.int64))
            for c in range(0, rows_logits.shape[0], chunk_rows):
                chunk = rows_logits[c : c + chunk_rows]
                if method == "topk":
                    ids, probs, rest = topk_targets(chunk, spec.k, spec.temperature, spec.rest)
                    builder.add("ids", ids.reshape(-1).cpu().numpy())
                    builder.add("probs", probs.reshape(-1).cpu().numpy())
                    if rest is not None:
                        builder.add("rest", rest.cpu().numpy())
                else:
                    ids, counts, num_unique, neg_entropy = sampled_targets(chunk, spec.k, spec.temperature, generator)
                    builder.add("ids", ids.cpu().numpy())
                    builder.add("counts", counts.cpu().numpy())
                    builder.add("num_unique", num_unique.cpu().numpy())
                    builder.add("neg_entropy", neg_entropy.cpu().numpy())
            bar.update(len(row_lengths))
        builder.hashes = hashes[start:end].tolist()
        _save_shard(builder, shards_dir / f"shard-{index:05d}")
        seconds = time.perf_counter() - shard_start
        teacher_seconds += seconds
        computed += 1
        manifest["shards"][str(index)] = {"rows": [start, end], "seconds": round(seconds, 3)}
        _write_json(manifest_path, manifest)

    # ---- the final dataset: the input columns plus the targets
    from datasets import concatenate_datasets, load_from_disk

    parts = [load_from_disk(str(shards_dir / f"shard-{i:05d}")) for i in range(num_shards)]
    targets = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    base = dataset.remove_columns([c for c in dataset.column_names if c in CACHE_COLUMNS])
    if base._indices is not None:
        base = base.flatten_indices()
    full = concatenate_datasets([base, targets], axis=1)
    for stale in output.glob("data-*.arrow"):
        stale.unlink()
    with _quiet_datasets(not progress):
        full.save_to_disk(str(output))
    final = load_from_disk(str(output))
    manifest["complete"] = True
    _write_json(manifest_path, manifest)
    if not keep_shards:
        shutil.rmtree(shards_dir, ignore_errors=True)
    result = _result(output, final, spec, started, teacher_seconds, computed, reused)
    bar.set_postfix(bytes_per_token=f"{result.bytes_per_token:.1f}")
    bar.close()
    logger.info(
        "Teacher cache %s: %s k=%d T=%g, %d positions, %.1f bytes per token (%d shards computed, %d reused, %.1f s).",
        output,
        spec.method,
        spec.k,
        spec.temperature,
        result.num_positions,
        result.bytes_per_token,
        computed,
        reused,
        result.seconds,
    )
    return result


def _save_shard(builder: _Shard, path: Path) -> None:
    from datasets import Dataset
    from datasets.table import InMemoryTable

    tmp = path.with_name(path.name + ".tmp")
    for folder in (tmp, path):
        if folder.exists():
            shutil.rmtree(folder)
    with _quiet_datasets():
        Dataset(InMemoryTable(builder.table())).save_to_disk(str(tmp))
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet_datasets(quiet: bool = True):
    """No "Saving the dataset" bar per shard: the caching bar says it all."""
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if quiet and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if quiet and not was_disabled:
            enable_progress_bars()


def _verified_final(output: Path, hashes: np.ndarray, spec: CachedTargetsSpec):
    from datasets import load_from_disk

    try:
        final = load_from_disk(str(output))
    except Exception:  # noqa: BLE001 - an unreadable final dataset is rebuilt
        return None
    if len(final) != len(hashes) or COLUMN_HASH not in final.column_names:
        return None
    stored = np.asarray(final.with_format("numpy", columns=[COLUMN_HASH])[COLUMN_HASH], dtype=np.int64)
    if not np.array_equal(stored, hashes) or final.unique(COLUMN_CONFIG) != [spec.to_json()]:
        return None
    return final


def _result(output: Path, final, spec, started, teacher_seconds, computed, reused) -> CachedTeacherLogits:
    target_bytes = sum(final.data.column(c).nbytes for c in spec.columns())
    if spec.per_position:
        if spec.method == "topk":
            lengths = final.data.column(COLUMN_IDS)
            import pyarrow.compute as pc

            num_positions = int(pc.sum(pc.list_value_length(lengths)).as_py() or 0) // spec.k
        else:
            import pyarrow.compute as pc

            num_positions = int(pc.sum(pc.list_value_length(final.data.column(COLUMN_NUM_ENTRIES))).as_py() or 0)
    else:
        num_positions = len(final)
    return CachedTeacherLogits(
        path=str(output),
        dataset=final,
        spec=spec,
        num_examples=len(final),
        num_positions=num_positions,
        target_bytes=int(target_bytes),
        bytes_per_token=target_bytes / max(1, num_positions),
        disk_bytes=_folder_bytes(output),
        seconds=time.perf_counter() - started,
        teacher_seconds=teacher_seconds,
        shards_computed=computed,
        shards_reused=reused,
    )
