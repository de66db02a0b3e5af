"""Availability checks for optional backends, with install hints in the errors they raise."""

from __future__ import annotations

import importlib.util
from functools import cache

_INSTALL_HINTS = {
    "bitsandbytes": "pip install 'bitsandbytes>=0.45'",
    "torchao": "pip install 'hf_compress[torchao]'  (or: pip install 'torchao>=0.12')",
    "peft": "pip install 'peft>=0.15'",
    "tensorboard": "pip install tensorboard",
    "deepspeed": "pip install 'hf_compress[deepspeed]'",
    "matplotlib": "pip install matplotlib",
    "yaml": "pip install pyyaml",
}


@cache
def _is_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def is_bitsandbytes_available() -> bool:
    return _is_available("bitsandbytes")


def is_torchao_available() -> bool:
    return _is_available("torchao")


def is_peft_available() -> bool:
    return _is_available("peft")


def is_deepspeed_available() -> bool:
    return _is_available("deepspeed")


def require_backend(name: str, feature: str) -> None:
    """Raise an `ImportError` naming the feature and how to install `name` if it is not importable."""
    if not _is_available(name):
        hint = _INSTALL_HINTS.get(name, f"pip install {name}")
        raise ImportError(f"{feature} needs the `{name}` package, which is not installed. Install it with: {hint}")
