"""Checking a recipe's field values against the library's own config classes and function signatures, so a field
added to a config is accepted (and type-checked) at once."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from transformers.utils import logging

from ..errors import RecipeError

logger = logging.get_logger(__name__)


# Arguments of the library functions that the runner fills in itself.
_RUNNER_ARGUMENTS = {
    "teacher",
    "model_or_path",
    "output_dir",
    "processing_class",
    "overwrite",
    "teacher_model_init_kwargs",
    "model_class",
}


def _did_you_mean(value: str, allowed) -> str:
    close = difflib.get_close_matches(str(value), sorted(allowed), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


# ----------------------------------------------------------------------------------------------------------------
# type checking of field values against annotations


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML/JSON value fits a type annotation (loosely: unknown constructs are accepted)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple, set, typing.Sequence, typing.MutableSequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(hint)
        return not args or all(_matches(v, args[0]) for v in value) if origin is not tuple else True
    if origin in (dict, typing.Mapping) or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        if issubclass(hint, enum.Enum):
            return isinstance(value, hint) or value in {m.value for m in hint} or value in hint.__members__
        if hint is bool:
            return isinstance(value, bool)
        if hint is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if hint is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if hint is str:
            return isinstance(value, str)
        if hint.__module__ == "torch" or hint.__module__.startswith("torch."):
            return True  # e.g. torch.dtype given as a string
        return isinstance(value, hint) or isinstance(value, (str, dict))
    return True


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__


def _dataclass_hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type of an (init) dataclass field; new config fields are picked up automatically."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: fall back to no type check
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def _signature_hints(fn: Callable) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    params = inspect.signature(fn).parameters
    return {
        name: hints.get(name, Any)
        for name, p in params.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in _RUNNER_ARGUMENTS and name != "self"
    }


def _check_fields(where: str, section: str, values: Any, hints: Mapping[str, Any]) -> None:
    if values is None:
        return
    if not isinstance(values, Mapping):
        raise RecipeError(
            f"{where}: field {section!r} must be a mapping of field: value, got {type(values).__name__}."
        )
    for key, value in values.items():
        if key not in hints:
            raise RecipeError(
                f"{where}: unknown field {section}.{key!r}; allowed: {sorted(hints)}." + _did_you_mean(key, hints)
            )
        if not _matches(value, hints[key]):
            raise RecipeError(
                f"{where}: field {section}.{key} has the wrong type: got {value!r} ({type(value).__name__}), "
                f"expected {_type_name(hints[key])}."
            )


__all__ = ["_check_fields", "_dataclass_hints", "_did_you_mean", "_signature_hints"]
