"""Output-folder safety, shared by every function of the library that writes a folder.

The rule: nothing the user wrote is deleted or overwritten without an explicit flag.

- A folder that does not exist, or exists and is empty, is written into.
- A non-empty folder is refused (`FileExistsError`, nothing touched) unless `overwrite=True`.
- `overwrite=True` removes only what hf_compress itself writes there (model weights and config, tokenizer, adapter,
  report and Trainer files, listed below), so a stale shard of an earlier save cannot mix with the new one; every
  other file in the folder is left as it is.

A model card (`README.md`) is never removed: [`~hf_compress.reporting.write_model_card`] updates its own section in
place and keeps the rest.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

# `save_pretrained` of a transformers model (sharded or not, safetensors or PyTorch)
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
)
# `save_pretrained` of a tokenizer or processor
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
)
# `save_pretrained` of a PEFT adapter
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# the compression report of a recipe stage or of the demo
REPORT_FILES = ("report.json", "report.md", "report.png")
# what a Trainer run started by the library writes into its `output_dir` (recipe stages)
TRAINER_FILES = ("training_args.bin", "trainer_state.json", "checkpoint-*", "pruning_masks.safetensors")

LIBRARY_FILES = MODEL_FILES + TOKENIZER_FILES + ADAPTER_FILES + REPORT_FILES


def _is_library_file(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def library_files(folder: str | os.PathLike, patterns: Iterable[str] = LIBRARY_FILES) -> list[Path]:
    """The entries of `folder` (not recursive) that hf_compress writes, i.e. whose name matches `patterns`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = tuple(patterns)
    return sorted(p for p in folder.iterdir() if _is_library_file(p.name, patterns))


def check_output_dir(path: str | os.PathLike, overwrite: bool, argument: str = "output_dir") -> Path:
    """Refuse an output folder that would lose the user's work; nothing is changed on disk.

    Args:
        path (`str` or `os.PathLike`): the folder to write.
        overwrite (`bool`): whether a non-empty folder may be written into (see [`clear_library_files`]).
        argument (`str`, *optional*, defaults to `"output_dir"`): the argument name the error message gives.

    Raises:
        FileExistsError: `path` is an existing file, or a non-empty folder and `overwrite=False`.
    """
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite={overwrite!r} must be True or False.")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{argument}={str(path)!r} is an existing file, not a folder.")
    if path.is_dir() and not overwrite:
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise FileExistsError(
                f"{argument}={str(path)!r} is not empty ({len(entries)} entries: {shown}); refusing to write there, "
                "nothing was changed. Pass overwrite=True (command line: --overwrite) to replace the files "
                "hf_compress writes there (other files are kept), or choose another folder."
            )
    return path


def clear_library_files(path: str | os.PathLike, patterns: Iterable[str] = LIBRARY_FILES) -> list[Path]:
    """Remove from `path` the entries hf_compress writes (names matching `patterns`); returns what was removed.

    Everything else in the folder is kept. A matching folder (a Trainer `checkpoint-*`) is removed with its content.
    """
    removed = library_files(path, patterns)
    for entry in removed:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if removed:
        logger.info(f"overwrite=True: removed {[p.name for p in removed]} from {str(path)!r}; other files kept.")
    return removed


def prepare_output_dir(
    path: str | os.PathLike,
    overwrite: bool,
    argument: str = "output_dir",
    patterns: Iterable[str] = LIBRARY_FILES,
) -> Path:
    """[`check_output_dir`], then (with `overwrite=True`) [`clear_library_files`], then create the folder.

    Returns:
        `Path`: the folder, existing and free of earlier hf_compress outputs.
    """
    path = check_output_dir(path, overwrite, argument)
    if overwrite:
        clear_library_files(path, patterns)
    path.mkdir(parents=True, exist_ok=True)
    return path


__all__ = [
    "ADAPTER_FILES",
    "LIBRARY_FILES",
    "MODEL_FILES",
    "REPORT_FILES",
    "TOKENIZER_FILES",
    "TRAINER_FILES",
    "check_output_dir",
    "clear_library_files",
    "library_files",
    "prepare_output_dir",
]
