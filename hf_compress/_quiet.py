"""Narrow filters for the warnings optional backends print when they are imported, and nothing else.

Importing torchao and bitsandbytes (which hf_compress does lazily, and transformers does when it probes them) prints
lines a user can do nothing about:

- torchao logs "Failed to load .../torchao/_C_*.so" for kernels its wheel ships for another CPython ABI or for CUDA
  when there is no GPU; those kernels could never be used here.
- torch's pytree module warns that torchao registers its own enums with `register_constant` (a deprecation aimed at
  torchao's developers).
- bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'" when
  the optional `kernels` package is absent; it falls back to its own CPU kernel.

Each filter drops only records matching its message (and the condition above) on the exact logger that emits them;
every other message of these loggers, and every other logger, is untouched. The dropped records are re-logged at
DEBUG level on `hf_compress.quiet`, so `HF_COMPRESS_SHOW_BACKEND_WARNINGS=1` or a DEBUG log level shows them again.
This module imports nothing heavy: `import hf_compress` stays fast.
"""

from __future__ import annotations

import logging
import os
import re
import sys

_DEBUG_LOGGER = logging.getLogger("hf_compress.quiet")
_SO_ABI = re.compile(r"cpython-(\d)(\d+)")


def _torchao_kernel_unusable(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if not message.startswith("Failed to load ") or "torchao" not in message or "_C" not in message:
        return False
    abi = _SO_ABI.search(message)
    if abi is not None and (int(abi.group(1)), int(abi.group(2))) != sys.version_info[:2]:
        return True  # built for another Python: never loadable by this interpreter
    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.version.cuda is not None and torch.cuda.is_available()
    return not cuda  # CUDA kernels (cutlass, mxfp8) without a usable GPU


def _torchao_enum_deprecation(record: logging.LogRecord) -> bool:
    if "is an Enum subclass and is now natively supported" not in str(record.msg):
        return False
    cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return getattr(cls, "__module__", "").startswith("torchao")


def _bitsandbytes_optional_kernels_missing(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return message.startswith("Failed to load CPU gemm_4bit_forward") and "No module named 'kernels'" in message


class _DropMatching(logging.Filter):
    def __init__(self, predicate):
        super().__init__()
        self.predicate = predicate

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            drop = self.predicate(record)
        except Exception:  # a filter must never break the logging call it inspects
            return True
        if drop:
            _DEBUG_LOGGER.debug("%s: %s", record.name, record.getMessage())
        return not drop


_FILTERS = {
    "torchao": _torchao_kernel_unusable,
    "torch.utils._pytree": _torchao_enum_deprecation,
    "bitsandbytes.backends.cpu.ops": _bitsandbytes_optional_kernels_missing,
}
_installed = False


def install_backend_warning_filters() -> None:
    """Attach the filters above to their loggers (once; `HF_COMPRESS_SHOW_BACKEND_WARNINGS=1` disables them)."""
    global _installed
    if _installed or os.environ.get("HF_COMPRESS_SHOW_BACKEND_WARNINGS", "").lower() in ("1", "true", "yes"):
        return
    _installed = True
    for name, predicate in _FILTERS.items():
        logging.getLogger(name).addFilter(_DropMatching(predicate))
