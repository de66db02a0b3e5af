"""The data a recipe names: its `dataset` field loaded as a `DatasetDict` and tokenized for the stages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers.utils import logging

from ..errors import RecipeError, UnavailableError
from .recipe import Recipe

logger = logging.get_logger(__name__)


def load_dataset_splits(spec: Mapping[str, Any]):
    """The raw `DatasetDict` a recipe's `dataset` field names (before tokenization).

    The embedded phishing URLs (`name: phishing`) or a CSV (`path:`) come with `train` / `validation` / `test` splits
    and `text` / `label` columns. A hub dataset (`hub:`) without `text_column` / `label_column` gets them named the
    same way (`labels` -> `label`; `url`, `sentence` or `content` -> `text`), and a held-out split carved from `train`
    (seeded, 70/15/15) when it has neither `test` nor `validation` and no `eval_split` is given.

    Raises:
        UnavailableError: the hub dataset could not be loaded (no network, wrong name).
    """
    seed = spec.get("seed", 42)
    if "name" in spec or "path" in spec:
        from ..data import load_phishing_dataset

        return load_phishing_dataset(spec.get("path"), seed=seed, max_examples=spec.get("max_examples"))
    from datasets import DatasetDict, load_dataset

    try:
        data = load_dataset(spec["hub"])
    except Exception as err:  # offline errors come as ConnectionError, OSError, HF hub errors, ...
        raise UnavailableError(
            f"dataset.hub={spec['hub']!r} could not be loaded from the Hugging Face Hub ({type(err).__name__}: "
            f"{err}). Without network access, use the phishing URL data embedded in hf_compress (recipe: "
            "`dataset: {name: phishing}`; `hf-compress demo`: leave out --dataset)."
        ) from err
    if "text_column" not in spec and "label_column" not in spec:
        data = DatasetDict({k: _text_and_label(v, spec["hub"]) for k, v in data.items()})
    if "test" not in data and "validation" not in data and "eval_split" not in spec and "train" in data:
        held = data["train"].train_test_split(test_size=0.3, seed=seed)
        rest = held["test"].train_test_split(test_size=0.5, seed=seed)
        data = DatasetDict({"train": held["train"], "validation": rest["train"], "test": rest["test"]})
    if spec.get("max_examples"):
        data = DatasetDict(
            {k: v.shuffle(seed=seed).select(range(min(len(v), spec["max_examples"]))) for k, v in data.items()}
        )
    return data


def _text_and_label(ds, name: str):
    if "labels" in ds.column_names and "label" not in ds.column_names:
        ds = ds.rename_column("labels", "label")
    if "text" not in ds.column_names:
        text_cols = [c for c in ds.column_names if c in ("url", "sentence", "content")]
        if not text_cols:
            raise ValueError(f"dataset.hub={name!r} needs a text column (set text_column), has {ds.column_names}.")
        ds = ds.rename_column(text_cols[0], "text")
    return ds


def _load_data(recipe: Recipe, tokenizer, label2id: Mapping[str, int] | None = None):
    """Tokenized train and evaluation splits. Every dataset field is checked against the data here, before any stage
    trains: the splits and columns exist, and string labels map to the model's `label2id`."""
    spec = recipe.dataset
    data = load_dataset_splits(spec)
    text_col, label_col = spec.get("text_column", "text"), spec.get("label_column", "label")
    train_split = spec.get("train_split", "train")
    eval_split = spec.get("eval_split") or ("test" if "test" in data else "validation")
    for field_name, split in (("train_split", train_split), ("eval_split", eval_split)):
        if split not in data:
            raise RecipeError(f"recipe: field dataset.{field_name}: split {split!r} not found; splits: {list(data)}.")
    for field_name, column in (("text_column", text_col), ("label_column", label_col)):
        for split in (train_split, eval_split):
            if column not in data[split].column_names:
                raise RecipeError(
                    f"recipe: field dataset.{field_name}: column {column!r} not found in split {split!r}; columns: "
                    f"{data[split].column_names}."
                )
    to_id = _label_ids(data[train_split], label_col, label2id)
    max_length = spec.get("max_length", 128)

    def encode(batch):
        enc = tokenizer(batch[text_col], truncation=True, max_length=max_length)
        enc["labels"] = [to_id(v) for v in batch[label_col]]
        return enc

    encoded = {}
    for split in (train_split, eval_split):
        ds = data[split]
        if to_id is not _identity:
            _label_ids(ds, label_col, label2id)  # every label of every split must map
        encoded[split] = ds.map(encode, batched=True, remove_columns=ds.column_names)
    return encoded[train_split], encoded[eval_split]


def _identity(value: Any) -> Any:
    return value


def _label_ids(ds, column: str, label2id: Mapping[str, int] | None):
    """How the values of a label column become class ids: integers as they are; strings through the model's
    `label2id` (exact, else case-insensitive). Raises `RecipeError` naming the labels that do not map."""
    values = set(ds.unique(column))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return _identity
    if not all(isinstance(v, str) for v in values):
        raise RecipeError(f"recipe: dataset labels in column {column!r} must be integers or strings, got {values}.")
    mapping = dict(label2id or {})
    lower = {k.lower(): v for k, v in mapping.items()}
    missing = sorted(v for v in values if v not in mapping and v.lower() not in lower)
    if missing:
        raise RecipeError(
            f"recipe: dataset labels {missing} (column {column!r}) are not in the model's label2id {mapping}: set the "
            "model config's label2id/id2label to these names, or use integer labels."
        )
    return lambda v: mapping[v] if v in mapping else lower[v.lower()]


__all__ = ["load_dataset_splits", "load_text_blocks"]


def load_text_blocks(spec: Mapping[str, Any], tokenizer) -> tuple[list[dict], list[dict]]:
    """Train and evaluation blocks of a causal-LM recipe: `<text_dir>/train.txt` and `<text_dir>/test.txt` (else
    `valid.txt`), each tokenized as one text and cut into non-overlapping `block_size` (default 512) token blocks
    (`input_ids` and `labels`), the first `max_train_tokens` / `max_eval_tokens` tokens of each."""
    import os
    from pathlib import Path

    import torch

    folder = Path(os.path.expanduser(str(spec["text_dir"])))
    block = int(spec.get("block_size", 512))
    splits = []
    for names, limit in ((("train",), spec.get("max_train_tokens")), (("test", "valid"), spec.get("max_eval_tokens"))):
        path = next((folder / f"{n}.txt" for n in names if (folder / f"{n}.txt").is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"dataset.text_dir: no {' or '.join(n + '.txt' for n in names)} in {str(folder)!r}."
            )
        ids = torch.tensor(tokenizer(path.read_text(encoding="utf-8"))["input_ids"], dtype=torch.long)
        ids = ids[: int(limit)] if limit else ids
        n = ids.numel() // block
        splits.append([{"input_ids": row, "labels": row} for row in ids[: n * block].view(n, block)])
    return splits[0], splits[1]
