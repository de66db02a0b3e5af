"""The embedded phishing-URL data (see PROVENANCE.md here) and an offline tokenizer trained on it.

These make the examples and `hf-compress demo` run without any network: the split is seeded and stratified, and
the tokenizer is trained on the training split only.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

PHISHING_CSV = Path(__file__).with_name("phishing_urls.csv")
PHISHING_LABELS = ("legitimate", "phishing")


def _host(url: str) -> str:
    try:
        return urlsplit(url).hostname or url
    except ValueError:
        return url


def _read_url_csv(path: Path) -> list[tuple[str, int]]:
    """(url, label index) rows of a `url,label` CSV, first occurrence of each URL only."""
    seen: set[str] = set()
    rows: list[tuple[str, int]] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"url", "label"} <= set(reader.fieldnames):
            raise ValueError(f"path: {str(path)!r} must have the columns 'url' and 'label', got {reader.fieldnames}.")
        for row in reader:
            url, label = row["url"].strip(), row["label"].strip().lower()
            if label not in PHISHING_LABELS:
                raise ValueError(f"path: label {label!r} in {str(path)!r}; allowed: {list(PHISHING_LABELS)}.")
            if url and url not in seen:
                seen.add(url)
                rows.append((url, PHISHING_LABELS.index(label)))
    return rows


def load_phishing_dataset(
    path: str | Path | None = None,
    *,
    seed: int = 42,
    test_size: float = 0.15,
    validation_size: float = 0.15,
    max_examples: int | None = None,
    group_by_host: bool = True,
):
    """The phishing URL data as a `datasets.DatasetDict` with `train`, `validation` and `test` splits.

    Columns: `text` (the URL) and `label` (0 legitimate, 1 phishing).

    Args:
        path (`str` or `Path`, *optional*): a CSV with `url,label` columns; defaults to the embedded copy.
        seed (`int`, *optional*, defaults to 42): seed of the split and of the sampling.
        test_size, validation_size (`float`, *optional*, default to 0.15): shares of the held-out splits
            (the reference pipeline used 70 / 15 / 15).
        max_examples (`int`, *optional*): a seeded, class-balanced sample of at most this many URLs.
        group_by_host (`bool`, *optional*, defaults to `True`): keep all URLs of one host in the same split.
    """
    from datasets import Dataset, DatasetDict

    if not 0 < test_size < 1 or not 0 < validation_size < 1 or test_size + validation_size >= 1:
        raise ValueError(
            f"test_size={test_size} and validation_size={validation_size} must each be in (0, 1) and sum below 1."
        )
    path = Path(path) if path is not None else PHISHING_CSV
    if not path.is_file():
        raise FileNotFoundError(f"path: no CSV file at {str(path)!r}.")
    rows = _read_url_csv(path)
    rng = random.Random(seed)
    if max_examples is not None and max_examples < len(rows):
        by_label: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for r in rows:
            by_label[r[1]].append(r)
        per_label = max_examples // len(by_label)
        rows = [
            r for label in sorted(by_label) for r in rng.sample(by_label[label], min(per_label, len(by_label[label])))
        ]

    # Stratified split over groups (hosts, or single URLs): each class is split on its own so both classes keep
    # their share in every split; a host seen in both classes is assigned by its majority class.
    groups: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for url, label in rows:
        groups[_host(url) if group_by_host else url].append((url, label))
    by_class: dict[int, list[list[tuple[str, int]]]] = defaultdict(list)
    for key in sorted(groups):
        members = groups[key]
        majority = round(sum(label for _, label in members) / len(members))
        by_class[majority].append(members)
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "validation": [], "test": []}
    for label in sorted(by_class):
        class_groups = by_class[label]
        rng.shuffle(class_groups)
        total = sum(len(g) for g in class_groups)
        filled = 0
        for g in class_groups:
            if filled < test_size * total:
                splits["test"].extend(g)
            elif filled < (test_size + validation_size) * total:
                splits["validation"].extend(g)
            else:
                splits["train"].extend(g)
            filled += len(g)
    for name in splits:
        rng.shuffle(splits[name])
    return DatasetDict(
        {
            name: Dataset.from_dict({"text": [u for u, _ in items], "label": [lab for _, lab in items]})
            for name, items in splits.items()
        }
    )


def train_url_tokenizer(texts, vocab_size: int = 1024, model_max_length: int = 128):
    """A BERT-style WordPiece tokenizer trained from scratch on `texts` (URLs), wrapped for transformers.

    URLs have no spaces, so the pre-tokenizer splits on punctuation and digits; WordPiece then learns sub-words
    (`paypal`, `login`, `.com`). Special tokens: [PAD] [UNK] [CLS] [SEP] [MASK], with [CLS] ... [SEP] added.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 64:
        raise ValueError(f"vocab_size={vocab_size} is too small; use at least 64.")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.Digits()])
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2)
    tok.train_from_iterator(iter(texts), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )


__all__ = ["PHISHING_CSV", "PHISHING_LABELS", "load_phishing_dataset", "train_url_tokenizer"]
