"""Checkpoints that are whole or refused: atomic writes with checksums, and finding the last complete checkpoint.

transformers writes a checkpoint folder file by file (weights, optimizer, scheduler, RNG states, then
`trainer_state.json`), and callbacks add theirs in `on_save`, after the state. A process killed in between leaves a
folder that `resume_from_checkpoint=True` picks (it takes the highest step) and then fails on. The helpers here
check the files of a checkpoint without loading them (safetensors headers against file sizes, zip directories of
`torch.save` files, JSON) and pick the last checkpoint that passes.

Plain `Trainer` users: `trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))`;
[`DistillationTrainer`] does this itself for `resume_from_checkpoint=True`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

CHECKSUM_SUFFIX = ".sha256"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TORCH_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "training_args.bin")
_WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CorruptCheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, or does not hold what its run recorded. The message names the
    file and the problem."""


# ---------------------------------------------------------------------------------------------- writing
def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part: a temporary
    file in the same folder, flushed to disk, then renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_with_checksum(path: str | os.PathLike, data: bytes) -> str:
    """Atomically write `data` to `path` and its sha256 to `path.sha256` (written second: a file without its
    checksum was interrupted). Returns the hex digest."""
    digest = sha256_hex(data)
    atomic_write_bytes(path, data)
    atomic_write_bytes(f"{os.fspath(path)}{CHECKSUM_SUFFIX}", f"{digest}  {Path(path).name}\n".encode())
    return digest


def read_verified_bytes(path: str | os.PathLike, *, require_checksum: bool = False) -> tuple[bytes, bool]:
    """The bytes of `path`, checked against `path.sha256` when it exists. Returns `(data, checksum_verified)`.

    Raises:
        CorruptCheckpointError: the file cannot be read, the checksum differs, or it is missing and required.
    """
    path = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise CorruptCheckpointError(f"{path}: cannot be read ({err.strerror or err}).") from None
    sidecar = path + CHECKSUM_SUFFIX
    if not os.path.isfile(sidecar):
        if require_checksum:
            raise CorruptCheckpointError(f"{path}: its checksum file {sidecar} is missing (the save was interrupted).")
        return data, False
    recorded = Path(sidecar).read_text().split()
    actual = sha256_hex(data)
    if not recorded or recorded[0] != actual:
        raise CorruptCheckpointError(
            f"{path}: checksum mismatch: the file's sha256 is {actual[:16]}..., {sidecar} records "
            f"{(recorded[0] if recorded else '<empty>')[:16]}...; the file was changed or corrupted after it was "
            "saved."
        )
    return data, True


# ------------------------------------------------------------------------------------- reading without loading
def safetensors_header(data_or_path: bytes | str | os.PathLike, name: str | None = None) -> dict[str, Any]:
    """The JSON header of a safetensors file (its tensors' dtypes, shapes, offsets and `__metadata__`), after
    checking that the file is as long as the header says. Reads only the header for a path.

    Raises:
        CorruptCheckpointError: naming the file, when it is shorter than its header says or the header is unreadable.
    """
    if isinstance(data_or_path, (bytes, bytearray)):
        name, size, data = name or "<bytes>", len(data_or_path), bytes(data_or_path)
        head = data[:8]
    else:
        name = os.fspath(data_or_path)
        size = os.path.getsize(name)
        with open(name, "rb") as handle:
            head = handle.read(8)
            header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = handle.read(header_len) if header_len is not None and header_len <= size else b""
        data = head + raw
    if len(head) < 8:
        raise CorruptCheckpointError(f"{name}: truncated ({size} bytes): not a safetensors file.")
    header_len = struct.unpack("<Q", head)[0]
    if 8 + header_len > size:
        raise CorruptCheckpointError(
            f"{name}: truncated: the header announces {header_len} bytes but the file has {size} bytes in all."
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(f"{name}: unreadable safetensors header ({err}).") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{name}: unreadable safetensors header (not a JSON object).")
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise CorruptCheckpointError(
            f"{name}: truncated or padded: its tensors end at byte {8 + header_len + end} but the file has {size}."
        )
    return header


def checkpoint_problems(folder: str | os.PathLike) -> list[str]:
    """What makes `folder` an incomplete checkpoint (empty list: complete), checked without loading any tensor.

    A complete checkpoint has a readable `trainer_state.json` (transformers writes it after the weights, optimizer,
    scheduler and RNG states), model or adapter weights whose files are as long as their headers say, `torch.save`
    files with an intact zip directory, and every `<file>.sha256` matching its file (hf_compress callbacks write
    their files with a checksum, e.g. `pruning_masks.safetensors`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems: list[str] = []
    state_path = folder / "trainer_state.json"
    if not state_path.is_file():
        problems.append("trainer_state.json is missing (the save stopped before the trainer state was written)")
    else:
        try:
            state = json.loads(state_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            problems.append(f"trainer_state.json is unreadable ({err})")
        else:
            problems += _declared_files_missing(folder, state)
    weights = [folder / f for f in _WEIGHT_FILES if (folder / f).is_file()]
    for index_name in _INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, KeyError, TypeError, ValueError) as err:
                problems.append(f"{index_name} is unreadable ({err})")
                continue
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                problems.append(f"{index_name} names missing shards {missing[:3]}")
            weights += [folder / s for s in shards if (folder / s).is_file()]
    sharded = any(
        p.is_dir() and (p.name.startswith("pytorch_model_fsdp") or p.name.startswith("global_step"))
        for p in folder.iterdir()
    )
    if not weights and not sharded:
        problems.append("no model or adapter weights")
    for path in weights:
        if path.suffix == ".safetensors":
            try:
                safetensors_header(path)
            except CorruptCheckpointError as err:
                problems.append(str(err))
        elif not zipfile.is_zipfile(path):
            problems.append(f"{path.name} is truncated (no zip directory)")
    for name in _TORCH_FILES:
        path = folder / name
        if path.is_file() and not zipfile.is_zipfile(path):
            problems.append(f"{name} is truncated (no zip directory)")
    for sidecar in folder.glob(f"*{CHECKSUM_SUFFIX}"):
        target = sidecar.with_name(sidecar.name[: -len(CHECKSUM_SUFFIX)])
        if not target.is_file():
            problems.append(f"{target.name} is missing but its checksum file exists")
            continue
        try:
            read_verified_bytes(target)
        except CorruptCheckpointError as err:
            problems.append(str(err))
    for tmp in folder.glob(".*.tmp-*"):
        problems.append(f"{tmp.name}: an interrupted write")
    return problems


def _declared_files_missing(folder: Path, state: Any) -> list[str]:
    """Files that callbacks declared in their saved state (`"checkpoint_files"`, written by hf_compress callbacks
    that add files in `on_save`, after transformers wrote the state) but that are not in `folder`."""
    problems = []
    stateful = state.get("stateful_callbacks") if isinstance(state, dict) else None
    for name, entries in (stateful or {}).items():
        for entry in entries if isinstance(entries, list) else [entries]:
            for file in (entry or {}).get("checkpoint_files", []) if isinstance(entry, dict) else []:
                if not (folder / file).is_file():
                    problems.append(f"{file} is missing (recorded by {name}; the save was interrupted)")
    return problems


def resumed_checkpoint_folder(args) -> str | None:
    """The checkpoint folder the running `Trainer.train()` resumed from, for callbacks that add files to
    checkpoints: `args.resume_from_checkpoint` when it is a path (scripts and [`DistillationTrainer`] set it),
    else the `resume_from_checkpoint` argument of the `Trainer.train()` call this runs under (found on the call
    stack, since the Trainer does not pass it to callbacks), else None."""
    value = getattr(args, "resume_from_checkpoint", None)
    if isinstance(value, (str, os.PathLike)) and os.path.isdir(value):
        return os.fspath(value)
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if (
                frame.f_code.co_name in ("train", "_inner_training_loop")
                and "resume_from_checkpoint" in frame.f_locals
            ):
                value = frame.f_locals["resume_from_checkpoint"]
                if isinstance(value, (str, os.PathLike)) and os.path.isdir(value):
                    return os.fspath(value)
            frame = frame.f_back
    finally:
        del frame
    return None


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether `folder` passes [`checkpoint_problems`]."""
    return not checkpoint_problems(folder)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The `checkpoint-<step>` folder of `output_dir` with the highest step that is complete, or None.

    Incomplete ones (a process killed while saving) are skipped with a warning naming what is missing. Use it with a
    plain `Trainer`: `trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))`.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir():
            steps.append((int(match.group(1)), path))
    for _, path in sorted(steps, reverse=True):
        problems = checkpoint_problems(path)
        if not problems:
            return str(path)
        logger.warning(f"Skipping incomplete checkpoint {path}: {'; '.join(problems)}.")
    return None


__all__ = [
    "CorruptCheckpointError",
    "atomic_write_bytes",
    "checkpoint_problems",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
    "read_verified_bytes",
    "resumed_checkpoint_folder",
    "safetensors_header",
    "write_with_checksum",
]
