"""Argument checks shared by every config and entry point: each raises before any work is done, naming the argument,
the value and what is allowed.

Wrong types raise [`InvalidArgumentTypeError`], which is both a `TypeError` and a `ValueError` (as numpy's
`AxisError` is both a `ValueError` and an `IndexError`), so code that catches either keeps working.
"""

from __future__ import annotations

import difflib
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


class InvalidArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a `TypeError` that is also a `ValueError`)."""


def did_you_mean(value: Any, allowed: Iterable[str]) -> str:
    """`" Did you mean 'x'?"` for the closest allowed string, or an empty string."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_error(name: str, value: Any, what: str) -> InvalidArgumentTypeError:
    return InvalidArgumentTypeError(
        f"{name}={_short(value)} is not allowed: it must be {what}, got {type(value).__name__}."
    )


def is_real_number(value: Any) -> bool:
    """An int or float (numpy scalars included), but not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iuf"


def is_integer(value: Any) -> bool:
    """An int (numpy integer scalars included), but not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iu"


def check_choice(name: str, value: Any, allowed: Iterable[Any], *, allow_none: bool = False) -> Any:
    """`value` must be one of the strings `allowed`."""
    allowed = list(allowed)
    if value is None and allow_none:
        return value
    or_none = " or None" if allow_none else ""
    if not isinstance(value, str):
        raise _type_error(name, value, f"one of {allowed}{or_none}")
    if value not in allowed:
        raise ValueError(
            f"{name}={_short(value)} is not allowed: choose one of {allowed}{or_none}." + did_you_mean(value, allowed)
        )
    return value


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_none: bool = False,
) -> float | None:
    """A finite real number (not a bool) within the bounds; returns it as a float."""
    if value is None and allow_none:
        return None
    if not is_real_number(value):
        raise _type_error(name, value, "a number" + (" or None" if allow_none else ""))
    given, value = value, float(value)
    bounds = _describe_bounds(low, high, low_inclusive, high_inclusive)
    if not math.isfinite(value):
        raise ValueError(f"{name}={given!r} is not allowed: it must be a finite number{bounds}.")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        raise ValueError(f"{name}={given!r} is not allowed: it must be a number{bounds}.")
    return value


def check_int(
    name: str, value: Any, *, low: int | None = None, high: int | None = None, allow_none: bool = False
) -> int | None:
    """An integer (not a bool) within `[low, high]`."""
    if value is None and allow_none:
        return None
    if not is_integer(value):
        raise _type_error(name, value, "an integer" + _describe_bounds(low, high) + (" or None" if allow_none else ""))
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}={value!r} is not allowed: it must be an integer{_describe_bounds(low, high)}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _type_error(name, value, "True or False")
    return value


def check_callable(name: str, value: Any, *, allow_none: bool = True) -> Any:
    if value is None and allow_none:
        return value
    if not callable(value):
        raise _type_error(name, value, "a callable" + (" or None" if allow_none else ""))
    return value


def check_patterns(name: str, value: Any, *, allow_none: bool = True) -> str | list[str] | None:
    """Module names / regexes: a string, a list or tuple of strings, or None."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    bad = [v for v in value if not isinstance(v, str)] if isinstance(value, (list, tuple)) else None
    detail = f" (entries that are not strings: {_short(bad)})" if bad else ""
    raise InvalidArgumentTypeError(
        f"{name}={_short(value)} is not allowed: it must be a module name or regex, a list of them"
        + (", or None" if allow_none else "")
        + detail
        + "."
    )


def check_int_list(
    name: str, value: Any, *, low: int | None = None, allow_none: bool = True, allow_empty: bool = True
) -> list[int] | None:
    """A list or tuple of integers (not bools) >= `low`."""
    if value is None and allow_none:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise _type_error(name, value, "a list of integers" + (" or None" if allow_none else ""))
    bad = [v for v in value if not is_integer(v) or (low is not None and v < low)]
    if bad:
        raise ValueError(
            f"{name}={_short(value)} is not allowed: every entry must be an integer{_describe_bounds(low, None)}; "
            f"got {_short(bad)}."
        )
    if not value and not allow_empty:
        raise ValueError(f"{name}=[] is not allowed: it must name at least one entry.")
    return [int(v) for v in value]


def check_path(name: str, value: Any, *, allow_none: bool = True) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value.strip()):
        raise _type_error(name, value, "a non-empty path (str or os.PathLike)" + (" or None" if allow_none else ""))
    return os.fspath(value)


def check_output_folder(name: str, value: Any, *, allow_none: bool = True) -> str | None:
    """A folder path that is not an existing file (a file there would make every save fail, or save nothing)."""
    path = check_path(name, value, allow_none=allow_none)
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name}={path!r} is not allowed: it is an existing file, and a folder is needed there.")
    return path


def check_writable_folder(name: str, path: str | os.PathLike) -> None:
    """Raise a `ValueError` now if `path` could not be created or written later: an existing file at the path or on
    the way to it, or a folder where files cannot be created (probed with a temporary file, so read-only mounts and
    permissions are seen as they are, also for root). Nothing is left behind."""
    target = Path(os.fspath(path)).expanduser().absolute()
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        where = "is" if existing == target else f"cannot be created: {str(existing)!r} is"
        raise ValueError(f"{name}={str(path)!r} {where} an existing file, not a folder; choose another folder.")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".hf_compress_write_probe_"):
            pass
    except OSError as err:
        raise ValueError(
            f"{name}={str(path)!r} is not writable ({str(existing)!r}: {err.strerror or err}); the run would fail "
            "when it first saves. Choose a writable folder."
        ) from None


def check_mapping(name: str, value: Any, *, allow_none: bool = True) -> dict | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _type_error(name, value, "a dict with string keys" + (" or None" if allow_none else ""))
    return dict(value)


def check_dtype(name: str, value: Any, allowed: Sequence[str] = ("float32", "bfloat16", "float16")) -> Any:
    """A torch floating dtype or its name (`"bfloat16"`, `"torch.bfloat16"`)."""
    import torch

    if isinstance(value, torch.dtype):
        if str(value).removeprefix("torch.") in allowed:
            return value
        raise ValueError(f"{name}={value!r} is not allowed: choose one of {list(allowed)}.")
    if not isinstance(value, str):
        raise _type_error(name, value, f"a torch dtype or one of {list(allowed)}")
    if value.removeprefix("torch.") not in allowed:
        raise ValueError(
            f"{name}={value!r} is not allowed: choose one of {list(allowed)}." + did_you_mean(value, allowed)
        )
    return value


_DEVICE_MAP_STRINGS = ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "cuda", "mps", "xpu", "npu", "disk")


def _is_device(value: Any) -> bool:
    import torch

    if isinstance(value, torch.device) or is_integer(value):
        return not is_integer(value) or value >= 0
    if isinstance(value, str):
        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            return value == "disk"
        return True
    return False


def check_device_map(name: str, value: Any, *, allow_none: bool = True) -> Any:
    """What `from_pretrained(device_map=...)` accepts: `"auto"`-style strategies, a device (`"cpu"`, `"cuda:0"`,
    an index, a `torch.device`) or a dict from module names to devices."""
    if value is None and allow_none:
        return value
    if isinstance(value, Mapping):
        bad = {k: v for k, v in value.items() if not isinstance(k, str) or not _is_device(v)}
        if bad:
            raise ValueError(
                f"{name}={_short(value)} is not allowed: a dict device_map maps module names (str) to devices "
                f"('cpu', 'cuda:0', 0, 'disk'); these entries are not: {_short(bad)}."
            )
        return value
    if isinstance(value, str) and value in _DEVICE_MAP_STRINGS:
        return value
    if _is_device(value):
        return value
    if isinstance(value, str):
        raise ValueError(
            f"{name}={value!r} is not allowed: use one of {list(_DEVICE_MAP_STRINGS)}, a device such as 'cuda:0', "
            "or a dict {module name: device}." + did_you_mean(value, _DEVICE_MAP_STRINGS)
        )
    raise _type_error(name, value, "a str, a device index, a torch.device or a dict {module name: device}")


def check_model_class(name: str, value: Any, *, allow_none: bool = True) -> Any:
    """A class that loads with `from_pretrained` (a `PreTrainedModel` subclass or an `AutoModel*` class)."""
    if value is None and allow_none:
        return value
    if not isinstance(value, type) or not callable(getattr(value, "from_pretrained", None)):
        raise _type_error(
            name, value, "a model class with from_pretrained (e.g. AutoModelForCausalLM or LlamaForCausalLM)"
        )
    return value


def _describe_bounds(
    low: float | None, high: float | None, low_inclusive: bool = True, high_inclusive: bool = True
) -> str:
    if low is not None and high is not None:
        return f" in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    if low is not None:
        return f" {'>=' if low_inclusive else '>'} {low:g}"
    if high is not None:
        return f" {'<=' if high_inclusive else '<'} {high:g}"
    return ""


__all__ = [
    "InvalidArgumentTypeError",
    "check_bool",
    "check_callable",
    "check_choice",
    "check_device_map",
    "check_dtype",
    "check_int",
    "check_int_list",
    "check_mapping",
    "check_model_class",
    "check_number",
    "check_output_folder",
    "check_path",
    "check_patterns",
    "check_writable_folder",
    "did_you_mean",
    "is_integer",
    "is_real_number",
]


# ---------------------------------------------------------------------------------------------- QLoRA helpers
# The argument checks of `hf_compress.qlora`'s public functions, kept here so that module stays as it is: each is
# called first thing in its function, before a model is loaded or wrapped.
_LORA_SET_BY_HELPERS = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "task_type")


def check_float_dtype(name: str, value: Any) -> Any:
    """A floating-point torch dtype or its name (`"bfloat16"`, `"torch.float16"`)."""
    import torch

    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    else:
        raise _type_error(name, value, "a torch floating dtype or its name (bfloat16, float16, float32)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"{name}={value!r} is not allowed: dtype {value!r} is not a floating point torch dtype (use bfloat16, "
            "float16 or float32)."
        )
    return value


def _check_module_names(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _type_error(name, value, "a list of module names or None")


def _check_lora_kwargs(value: Any) -> None:
    value = check_mapping("lora_kwargs", value)
    if not value:
        return
    import dataclasses

    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    for key in value:
        if key in _LORA_SET_BY_HELPERS:
            raise ValueError(
                f"lora_kwargs={_short(value)} is not allowed: {key!r} is set by its own argument "
                f"(lora_r, lora_alpha, lora_dropout, target_modules, modules_to_save, task) or by the task."
            )
        if key not in known:
            raise ValueError(
                f"lora_kwargs={_short(value)} is not allowed: {key!r} is not a peft.LoraConfig field."
                + did_you_mean(key, sorted(known))
            )


def check_lora_arguments(
    *,
    lora_r: Any,
    lora_alpha: Any,
    lora_dropout: Any,
    target_modules: Any,
    exclude_modules: Any,
    modules_to_save: Any,
    gradient_checkpointing: Any,
    loftq: Any,
    lora_kwargs: Any,
) -> None:
    """The LoRA arguments shared by `prepare_qlora` and `load_qlora_model`."""
    check_int("lora_r", lora_r, low=1)
    check_number("lora_alpha", lora_alpha, low=0.0, low_inclusive=False, allow_none=True)
    check_number("lora_dropout", lora_dropout, low=0.0, high=1.0, high_inclusive=False)
    check_patterns("target_modules", target_modules)
    check_patterns("exclude_modules", exclude_modules)
    _check_module_names("modules_to_save", modules_to_save)
    check_bool("gradient_checkpointing", gradient_checkpointing)
    check_bool("loftq", loftq)
    _check_lora_kwargs(lora_kwargs)


def _check_qlora_task(task: Any, *, allow_none: bool) -> None:
    # Unknown names are reported by qlora's own check (which also knows what the model supports); types here.
    if task is None and allow_none:
        return
    if not isinstance(task, str) or not task:
        from ..qlora import _TASKS

        raise _type_error("task", task, f"one of {sorted(_TASKS)}" + (" or None" if allow_none else ""))


def check_model_argument(name: str, value: Any) -> None:
    import torch

    if not isinstance(value, torch.nn.Module):
        raise _type_error(name, value, "a model (torch.nn.Module, e.g. a transformers PreTrainedModel)")


def check_model_path(name: str, value: Any) -> str:
    """A local model folder or a hub name: a path that looks local (`./x`, `/x`, `~/x`, `a/b/c`) must exist."""
    path = check_path(name, value, allow_none=False)
    if os.path.exists(os.path.expanduser(path)):
        if not os.path.isdir(os.path.expanduser(path)) and not path.lower().endswith(".gguf"):
            raise ValueError(
                f"{name}={path!r} is not allowed: it is a file; pass the model's folder (or a .gguf file)."
            )
        return path
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ValueError(f"{name}={path!r} is not allowed: the folder does not exist.")
    return path


def check_find_lora_target_modules_arguments(model: Any, target_modules: Any, exclude_modules: Any) -> None:
    check_model_argument("model", model)
    check_patterns("target_modules", target_modules)
    check_patterns("exclude_modules", exclude_modules)


def check_prepare_qlora_arguments(model: Any, task: Any, *, loftq_model_path: Any, **lora: Any) -> None:
    check_model_argument("model", model)
    _check_qlora_task(task, allow_none=True)
    check_lora_arguments(**lora)
    check_path("loftq_model_path", loftq_model_path)


def check_load_qlora_model_arguments(
    model_name_or_path: Any,
    task: Any,
    *,
    load_in_4bit: Any,
    load_in_8bit: Any,
    bnb_4bit_quant_type: Any,
    bnb_4bit_use_double_quant: Any,
    bnb_4bit_compute_dtype: Any,
    num_labels: Any,
    device_map: Any,
    **lora: Any,
) -> None:
    check_model_path("model_name_or_path", model_name_or_path)
    _check_qlora_task(task, allow_none=False)
    check_lora_arguments(**lora)
    check_bool("load_in_4bit", load_in_4bit)
    check_bool("load_in_8bit", load_in_8bit)
    check_choice("bnb_4bit_quant_type", bnb_4bit_quant_type, ["nf4", "fp4"])
    check_bool("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant)
    check_float_dtype("bnb_4bit_compute_dtype", bnb_4bit_compute_dtype)
    check_int("num_labels", num_labels, low=1, allow_none=True)
    check_device_map("device_map", device_map)


def check_merge_qlora_arguments(
    model_or_adapter_path: Any,
    *,
    requantize: Any,
    base_model_name_or_path: Any,
    dequantize_base: Any,
    dtype: Any,
    compute_metrics: Any,
    data_collator: Any,
    eval_batch_size: Any,
    overwrite: Any,
    model_kwargs: Any,
) -> None:
    """Every argument of `merge_qlora` but the output folders (whose safety is that function's own business)."""
    import torch

    if not isinstance(model_or_adapter_path, (str, os.PathLike, torch.nn.Module)):
        raise _type_error(
            "model_or_adapter_path", model_or_adapter_path, "a PeftModel or the folder of a saved adapter"
        )
    check_choice("requantize", requantize, ["nf4", "int8"], allow_none=True)
    if base_model_name_or_path is not None:
        check_model_path("base_model_name_or_path", base_model_name_or_path)
    check_bool("dequantize_base", dequantize_base)
    check_float_dtype("dtype", dtype)
    check_callable("compute_metrics", compute_metrics)
    check_callable("data_collator", data_collator)
    check_int("eval_batch_size", eval_batch_size, low=1)
    check_bool("overwrite", overwrite)
    check_mapping("model_kwargs", model_kwargs)
