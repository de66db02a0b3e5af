"""Task metrics behind one function: Hugging Face `evaluate` where its metric scripts load, scikit-learn offline.

`evaluate.load("accuracy")` fetches the metric's script from the Hub; without a network it fails, so every metric
here falls back to scikit-learn's implementation (the one the reference pipeline used). Both give the same numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1")


def _offline() -> bool:
    return any(
        os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE")
    )


@cache
def _load_evaluate_metric(name: str):
    """The `evaluate` metric, or None when it cannot be loaded (offline, no cache)."""
    if _offline():
        return None
    try:
        import evaluate

        return evaluate.load(name)
    except Exception as err:  # network errors come in many types; any failure means "use scikit-learn"
        logger.info("evaluate.load(%r) failed (%s); using scikit-learn instead.", name, type(err).__name__)
        return None


def _sklearn_metric(name: str, predictions: np.ndarray, references: np.ndarray, average: str) -> float:
    from sklearn import metrics as skm

    if name == "accuracy":
        return float(skm.accuracy_score(references, predictions))
    fn = {"precision": skm.precision_score, "recall": skm.recall_score, "f1": skm.f1_score}[name]
    return float(fn(references, predictions, average=average, zero_division=0))


def classification_metrics(
    predictions: Iterable[int] | np.ndarray,
    references: Iterable[int] | np.ndarray,
    *,
    average: str | None = None,
    metrics: Iterable[str] = CLASSIFICATION_METRICS,
    use_evaluate: bool = True,
) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of class predictions.

    Args:
        predictions (`array-like` of `int`): predicted class ids.
        references (`array-like` of `int`): true class ids.
        average (`str`, *optional*): averaging for precision/recall/F1; `"binary"` for two classes and `"macro"`
            otherwise when left out.
        metrics (`Iterable[str]`, *optional*): which of accuracy, precision, recall, f1 to compute.
        use_evaluate (`bool`, *optional*, defaults to `True`): try `evaluate` first, fall back to scikit-learn.

    >>> classification_metrics([1, 0, 1, 1], [1, 0, 0, 1])["accuracy"]
    0.75
    """
    predictions = np.asarray(list(predictions) if not isinstance(predictions, np.ndarray) else predictions)
    references = np.asarray(list(references) if not isinstance(references, np.ndarray) else references)
    if predictions.shape != references.shape:
        raise ValueError(
            f"predictions and references must have the same shape, got {predictions.shape} and {references.shape}."
        )
    unknown = set(metrics) - set(CLASSIFICATION_METRICS)
    if unknown:
        raise ValueError(f"metrics: unknown metric(s) {sorted(unknown)}; allowed: {list(CLASSIFICATION_METRICS)}.")
    if average is None:
        average = "binary" if len(np.union1d(predictions, references)) <= 2 else "macro"
    results: dict[str, float] = {}
    for name in metrics:
        metric = _load_evaluate_metric(name) if use_evaluate else None
        if metric is not None:
            kwargs = {} if name == "accuracy" else {"average": average}
            results[name] = float(metric.compute(predictions=predictions, references=references, **kwargs)[name])
        else:
            results[name] = _sklearn_metric(name, predictions, references, average)
    return results


def make_compute_metrics(task: str = "classification", **kwargs: Any) -> Callable[[Any], dict[str, float]]:
    """A `compute_metrics` function for `Trainer`.

    Args:
        task (`str`, *optional*, defaults to `"classification"`): `"classification"` / `"sequence-classification"`
            (accuracy, precision, recall, F1 from argmax of the logits), `"token-classification"` (the same over the
            labelled tokens, -100 excluded) or `"causal-lm"` (token accuracy; perplexity comes from the eval loss).
            PEFT `TaskType` values and pipeline task names are accepted too (`SEQ_CLS`, `text-classification`,
            `TOKEN_CLS`, `CAUSAL_LM`, `text-generation`, ...).
        kwargs: passed to [`classification_metrics`].
    """
    from .utils.tasks import CAUSAL_LM, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, normalize_task

    task = normalize_task(task, (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, CAUSAL_LM))
    if task == TOKEN_CLASSIFICATION:

        def compute_token_metrics(eval_pred) -> dict[str, float]:
            logits, labels = eval_pred.predictions, eval_pred.label_ids
            if isinstance(logits, tuple):
                logits = logits[0]
            keep = labels != -100
            return classification_metrics(np.argmax(logits, axis=-1)[keep], labels[keep], **kwargs)

        return compute_token_metrics
    if task == SEQUENCE_CLASSIFICATION:

        def compute_metrics(eval_pred) -> dict[str, float]:
            logits, labels = eval_pred.predictions, eval_pred.label_ids
            if isinstance(logits, tuple):
                logits = logits[0]
            return classification_metrics(np.argmax(logits, axis=-1), labels, **kwargs)

        return compute_metrics
    # causal LM: accuracy of the next-token predictions

    def compute_lm_metrics(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        preds = np.argmax(logits[:, :-1], axis=-1)
        targets = labels[:, 1:]
        keep = targets != -100
        return {"token_accuracy": float((preds[keep] == targets[keep]).mean()) if keep.any() else float("nan")}

    return compute_lm_metrics


@torch.no_grad()
def compute_perplexity(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Perplexity of a causal LM over batches of `input_ids` (and optional `attention_mask` / `labels`).

    Token losses are summed over every predicted token and divided once by their count, so batches of different
    lengths are weighted by tokens, not by batch.
    """
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in batches:
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch.get("attention_mask")
        labels = batch.get("labels", input_ids)
        labels = labels.to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
            labels = labels.masked_fill(attention_mask == 0, -100)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total_nll += float(nll)
        total_tokens += int((shift_labels != -100).sum())
    if total_tokens == 0:
        raise ValueError("compute_perplexity: the batches hold no token to predict.")
    return math.exp(total_nll / total_tokens)
