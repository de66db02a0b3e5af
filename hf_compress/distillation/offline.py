"""Training from cached teacher targets: find and check them in a dataset, collate them, refuse what cannot work.

Used by `DistillationTrainer` when `teacher_model=None`; the targets come from `cache_teacher_logits`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .cache import (
    CACHE_COLUMNS,
    COLUMN_CONFIG,
    COLUMN_COUNTS,
    COLUMN_HASH,
    COLUMN_IDS,
    COLUMN_NEG_ENTROPY,
    COLUMN_NUM_ENTRIES,
    COLUMN_PROBS,
    COLUMN_REST,
    CachedTargetsSpec,
    _list_column,
    input_ids_hash,
)

# Keys of a collated batch: (batch, positions, entries) ids and probabilities, (batch, positions) rest / entropy.
BATCH_IDS = "teacher_token_ids"
BATCH_PROBS = "teacher_token_probs"
BATCH_REST = "teacher_rest_mass"
BATCH_NEG_ENTROPY = "teacher_neg_entropy"
BATCH_KEYS = (BATCH_IDS, BATCH_PROBS, BATCH_REST, BATCH_NEG_ENTROPY)
# Losses a cache cannot give: mse compares raw logits, which are not stored.
_NEEDS_LOGITS = ("mse",)
_SAMPLED_LOSSES = ("forward_kl",)


@functools.lru_cache(maxsize=64)
def _spec(text: str) -> CachedTargetsSpec:
    return CachedTargetsSpec.from_json(text)


def _column_names(dataset) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list):
        return names
    try:  # a map-style torch dataset of dicts
        first = dataset[0]
    except Exception:  # noqa: BLE001 - an iterable dataset: columns unknown before iterating
        return None
    return list(first) if isinstance(first, Mapping) else None


def cached_targets_spec(dataset, name: str = "train_dataset") -> CachedTargetsSpec | None:
    """The `CachedTargetsSpec` of the teacher targets `dataset` carries, or None if it carries none."""
    if dataset is None:
        return None
    columns = _column_names(dataset)
    if columns is None or COLUMN_CONFIG not in columns:
        partial = [c for c in CACHE_COLUMNS if columns is not None and c in columns]
        if partial:
            raise ValueError(
                f"{name} has teacher-cache columns {partial} but no {COLUMN_CONFIG!r} column: it was not made by "
                "cache_teacher_logits, or that column was removed."
            )
        return None
    if hasattr(dataset, "unique"):
        texts = dataset.unique(COLUMN_CONFIG)
    elif hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        texts = sorted({dataset[i][COLUMN_CONFIG] for i in range(len(dataset))})
    else:  # an iterable dataset: its first row here, every batch in the collator
        texts = [next(iter(dataset))[COLUMN_CONFIG]]
    if len(texts) != 1:
        raise ValueError(
            f"{name} mixes teacher caches made with different settings: {texts}. Cache the whole dataset at once."
        )
    spec = _spec(texts[0])
    missing = [c for c in spec.columns() if c not in columns]
    if missing:
        raise ValueError(f"{name} carries a {spec.method} teacher cache but lacks its columns {missing}.")
    return spec


def check_spec_for_training(
    spec: CachedTargetsSpec,
    *,
    name: str,
    task: str,
    temperature: float,
    loss_type: str,
    hidden_loss_weight: float,
    student_width: int | None,
    tokenizer_length: int | None,
) -> int | None:
    """Refuse a cache the run cannot use (names the mismatch); returns the shared logit width if one must be cut."""
    if spec.task != task:
        raise ValueError(
            f"{name}: the teacher targets were cached for task {spec.task!r} but the student is {task!r}."
        )
    if not math.isclose(spec.temperature, float(temperature), rel_tol=1e-6):
        raise ValueError(
            f"{name}: the teacher targets were cached at temperature {spec.temperature} but "
            f"DistillationConfig.temperature={temperature}. The temperature shapes the stored distribution: train at "
            f"temperature={spec.temperature} or cache again at {temperature}."
        )
    if loss_type in _NEEDS_LOGITS:
        raise ValueError(
            f"loss_type={loss_type!r} compares raw teacher logits, which a teacher cache does not hold; use "
            "'forward_kl', 'reverse_kl' or 'jsd' (topk caches), or pass teacher_model."
        )
    if spec.method == "sampled" and loss_type not in _SAMPLED_LOSSES:
        raise ValueError(
            f"loss_type={loss_type!r} is not defined on sampled teacher targets (they hold only the drawn tokens' "
            f"frequencies, not the teacher's probability of the tokens the student favours); allowed: "
            f"{list(_SAMPLED_LOSSES)}. Use a topk cache for {loss_type!r}."
        )
    if hidden_loss_weight > 0:
        raise ValueError(
            f"hidden_loss_weight={hidden_loss_weight} needs the teacher's hidden states, which a teacher cache does "
            "not hold; set hidden_loss_weight=0 or pass teacher_model."
        )
    if student_width is None or student_width == spec.vocab_size:
        return None
    if task != "causal-lm":
        raise ValueError(
            f"{name}: the teacher targets cover {spec.vocab_size} classes but the student predicts {student_width}; "
            "distillation needs the same label set."
        )
    if student_width > spec.vocab_size and tokenizer_length is not None and tokenizer_length <= spec.vocab_size:
        return spec.vocab_size  # the student's embedding matrix is padded beyond the real vocabulary
    raise ValueError(
        f"{name}: the teacher targets were cached over a vocabulary of {spec.vocab_size} tokens but the student has "
        f"{student_width} output logits: the vocabularies differ. (If only the student's embedding matrix is padded, "
        "pass its tokenizer as processing_class.)"
    )


def check_cached_rows(dataset, spec: CachedTargetsSpec, name: str = "train_dataset", batch_size: int = 4096) -> None:
    """Refuse rows whose cached targets do not match their `input_ids` (sequence length, then token-id hash)."""
    if not hasattr(dataset, "with_format") or not hasattr(dataset, "iter"):
        for index, row in enumerate(dataset):
            _check_row(row, spec, name, index)
        return
    import pyarrow.compute as pc

    length_column = COLUMN_NUM_ENTRIES if spec.method == "sampled" else COLUMN_IDS
    view = dataset.with_format("arrow", columns=["input_ids", length_column, COLUMN_HASH])
    start = 0
    hash_mismatches: list[int] = []
    for table in view.iter(batch_size=batch_size):
        offsets, values = _list_column(table, "input_ids")
        tokens = np.diff(offsets)
        stored = pc.list_value_length(table.column(length_column)).to_numpy(zero_copy_only=False).astype(np.int64)
        positions = stored // spec.k if spec.method == "topk" else stored
        expected = tokens if spec.per_position else np.ones_like(tokens)
        bad = np.nonzero(positions != expected)[0]
        if spec.method == "topk":
            bad = np.union1d(bad, np.nonzero(stored % spec.k)[0])
        if len(bad):
            i = int(bad[0])
            raise ValueError(_length_message(name, start + i, int(positions[i]), int(tokens[i]), spec, len(bad)))
        hashes = table.column(COLUMN_HASH).to_numpy()
        values = values.astype("<i8", copy=False)
        for i in range(len(tokens)):
            if input_ids_hash(values[offsets[i] : offsets[i + 1]]) != hashes[i]:
                hash_mismatches.append(start + i)
        start += len(tokens)
    if hash_mismatches:
        raise ValueError(_hash_message(name, hash_mismatches[0], len(hash_mismatches), start))


def _length_message(name, index, positions, tokens, spec, count=1) -> str:
    what = "positions" if spec.per_position else "distributions"
    return (
        f"{name} row {index}: the cached teacher targets hold {positions} {what} but input_ids has {tokens} tokens"
        f"{' (' + str(count) + ' rows differ)' if count > 1 else ''}: the sequence lengths differ from those the "
        "cache was made for (the dataset was re-tokenized, truncated or re-ordered after caching). Cache it again."
    )


def _hash_message(name, index, count, total) -> str:
    return (
        f"{name} row {index}: input_ids differ from the token ids the teacher targets were cached for "
        f"({count} of {total} rows differ): the targets belong to other text. Cache the dataset as it is now."
    )


def _positions_of(row: Mapping, spec: CachedTargetsSpec) -> int:
    if spec.method == "sampled":
        return len(row[COLUMN_NUM_ENTRIES])
    return len(row[COLUMN_IDS]) // spec.k


def _check_row(row: Mapping, spec: CachedTargetsSpec, name: str, index: int) -> None:
    ids = row.get("input_ids")
    if ids is None:
        return
    tokens = len(ids)
    positions = _positions_of(row, spec)
    if positions != (tokens if spec.per_position else 1):
        raise ValueError(_length_message(name, index, positions, tokens, spec))
    if input_ids_hash(_numpy(ids)) != int(_numpy(row[COLUMN_HASH])):
        raise ValueError(_hash_message(name, index, 1, 1))


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class CachedTargetsCollator:
    """Wraps a data collator: collates the rows' other columns with it, and pads the cached teacher targets.

    Adds to the batch `teacher_token_ids` (int32) and `teacher_token_probs` (float32) of shape (batch, positions,
    entries) aligned with `input_ids` (same padding side), plus `teacher_rest_mass` (topk) or `teacher_neg_entropy`
    (sampled) of shape (batch, positions). Each row's length and input hash are checked against its `input_ids`.
    Rows without cached targets go to the wrapped collator unchanged. `check` is called once per cache setting.
    """

    def __init__(self, data_collator, check=None):
        self.data_collator = data_collator
        self.check = check
        self._checked: set[str] = set()

    def __call__(self, features):
        if not features or not isinstance(features[0], Mapping) or COLUMN_CONFIG not in features[0]:
            return self.data_collator([self._strip(f) for f in features] if features else features)
        texts = {f.get(COLUMN_CONFIG) for f in features}
        if None in texts or len(texts) != 1:
            raise ValueError(
                f"a batch mixes rows with and without (or with different) cached teacher targets: {texts}."
            )
        text = texts.pop()
        spec = _spec(text)
        if text not in self._checked:
            if self.check is not None:
                self.check(spec)
            self._checked.add(text)
        rows = [{k: f[k] for k in CACHE_COLUMNS if k in f} for f in features]
        batch = self.data_collator([self._strip(f) for f in features])
        for index, (f, row) in enumerate(zip(features, rows)):
            _check_row({**row, "input_ids": f.get("input_ids")}, spec, "batch", index)
        batch.update(self._collate(rows, spec, batch))
        return batch

    @staticmethod
    def _strip(feature):
        if not isinstance(feature, Mapping):
            return feature
        return {k: v for k, v in feature.items() if k not in CACHE_COLUMNS}

    @staticmethod
    def _collate(rows: list[Mapping], spec: CachedTargetsSpec, batch: Mapping) -> dict[str, torch.Tensor]:
        lengths = [_positions_of(r, spec) for r in rows]
        width = max(lengths)
        left = [False] * len(rows)
        if spec.per_position and "input_ids" in batch:
            width = int(batch["input_ids"].shape[-1])
            mask = batch.get("attention_mask")
            for i, length in enumerate(lengths):
                if length > width:
                    raise ValueError(
                        f"batch row {i}: the collator returned {width} tokens but the row has {length} cached "
                        "positions; the data collator truncated it (cache the truncated dataset instead)."
                    )
                if length < width and mask is not None:
                    left[i] = bool(mask[i, 0] == 0) and bool(mask[i, width - length :].all())
        sampled = spec.method == "sampled"
        entries = spec.k
        if sampled:
            num_entries = [_numpy(r[COLUMN_NUM_ENTRIES]).astype(np.int64) for r in rows]
            entries = max(int(n.max()) if len(n) else 1 for n in num_entries)
        ids = np.zeros((len(rows), width, entries), dtype=np.int32)
        probs = np.zeros((len(rows), width, entries), dtype=np.float32)
        extra = np.zeros((len(rows), width), dtype=np.float32)
        for i, (row, length) in enumerate(zip(rows, lengths)):
            start = width - length if left[i] else 0
            if not sampled:
                ids[i, start : start + length] = _numpy(row[COLUMN_IDS]).reshape(length, entries)
                probs[i, start : start + length] = _numpy(row[COLUMN_PROBS]).reshape(length, entries)
                if spec.rest:
                    extra[i, start : start + length] = _numpy(row[COLUMN_REST])
                continue
            counts = num_entries[i]
            position = np.repeat(np.arange(length), counts)
            first = np.repeat(np.cumsum(counts) - counts, counts)
            slot = np.arange(len(position)) - first
            ids[i, start + position, slot] = _numpy(row[COLUMN_IDS])
            probs[i, start + position, slot] = _numpy(row[COLUMN_COUNTS]).astype(np.float32) / spec.k
            extra[i, start : start + length] = _numpy(row[COLUMN_NEG_ENTROPY])
        out = {BATCH_IDS: torch.from_numpy(ids), BATCH_PROBS: torch.from_numpy(probs)}
        if sampled:
            out[BATCH_NEG_ENTROPY] = torch.from_numpy(extra)
        elif spec.rest:
            out[BATCH_REST] = torch.from_numpy(extra)
        return out
