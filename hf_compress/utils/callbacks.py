"""Helpers for hf_compress's Trainer callbacks."""

from __future__ import annotations

import sys
from typing import Any


def dispatching_trainer(callback: Any, max_depth: int = 8) -> Any | None:
    """The `transformers.Trainer` whose callback handler is dispatching the current event to `callback`, or `None`.

    The Trainer's callback contract passes the model, the processing class, the optimizer and the dataloaders to a
    callback, never the trainer itself; a callback that needs the trainer's `compute_metrics` or eval dataset
    (such as [`PostTrainingQuantizationCallback`] passed as `callbacks=[...]`) would otherwise have to be bound by
    hand. The event is dispatched by `Trainer -> CallbackHandler.call_event -> callback.on_<event>`, so the trainer
    is the `self` of a frame a few levels up the stack; it is accepted only if `callback` is one of its callbacks.
    Must be called from within the callback's event method.
    """
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(max_depth):
        frame = frame.f_back
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and callback in getattr(candidate.callback_handler, "callbacks", ()):
            return candidate
    return None


__all__ = ["dispatching_trainer"]
