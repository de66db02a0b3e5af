"""Where a model named by a string lives: a saved folder, or a Hugging Face Hub name, checked before any loading.

`from_pretrained` given a folder that does not exist takes the string for a Hub name and, without network access,
retries for tens of seconds before a generic connection error; given a Trainer output folder that holds only
`checkpoint-*` sub-folders it says "Unrecognized model ... Should have a model_type key", true but misleading.
[`resolve_model_source`] says what is wrong at once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ModelNotFoundError, UnavailableError

# `name` or `org/name` as the Hub spells repository ids (letters, digits, -, _, .; at most 96 characters each).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
MODEL_FILES = ("config.json", "adapter_config.json")


def looks_like_hub_id(value: str) -> bool:
    """Whether `value` could be a Hub repository id (`gpt2`, `org/name`) rather than only a path."""
    return bool(_HUB_ID.match(value)) and not value.startswith(".") and ".." not in value


def checkpoint_folders(folder: str | os.PathLike) -> list[str]:
    """The `checkpoint-<step>` sub-folders of a Trainer output folder, by step."""
    folder = Path(folder)
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return [str(p) for p in sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))]


def check_saved_model_folder(folder: str | os.PathLike, argument: str = "model") -> Path:
    """`folder` if it holds a saved model (`config.json`, or a PEFT adapter's `adapter_config.json`), or is a `.gguf`
    file.

    Raises:
        [`ModelNotFoundError`] (a `FileNotFoundError` and a `ValueError`): naming the folder and, when it holds only Trainer checkpoints, saying how to save the
            model (`trainer.save_model()`) or which checkpoint to use instead.
    """
    folder = Path(folder).expanduser()
    if folder.is_file() and folder.suffix.lower() == ".gguf":
        return folder  # a GGUF checkpoint (dequantized on loading, see utils.loading)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{argument}: no folder at {str(folder)!r}.")
    if any((folder / name).is_file() for name in MODEL_FILES):
        return folder
    checkpoints = checkpoint_folders(folder)
    if checkpoints:
        raise ModelNotFoundError(
            f"{argument}: {str(folder)!r} holds Trainer checkpoints ({', '.join(Path(c).name for c in checkpoints)}) "
            "but no saved model: trainer.train() writes checkpoints only. Call trainer.save_model() after "
            f"trainer.train() (it writes the model to args.output_dir), or pass a checkpoint folder such as "
            f"{checkpoints[-1]!r}."
        )
    raise ModelNotFoundError(
        f"{argument}: {str(folder)!r} holds no saved model (no config.json): save one there with "
        "model.save_pretrained(folder) or trainer.save_model(folder)."
    )


def resolve_model_source(
    value: str | os.PathLike, argument: str = "model", *, base_dir: str | os.PathLike | None = None
) -> str:
    """The local folder (resolved), `.gguf` file or Hub name that `value` designates; raises before anything is
    loaded.

    A relative path is taken relative to `base_dir` when given (a recipe's folder), else to the working directory.
    A value that is not an existing folder must look like a Hub id (`name` or `org/name`): it is then accepted if it is
    in the local Hub cache, and otherwise looked up on the Hub once (a few seconds) so that a typo or a missing folder
    fails now with a clear message instead of after the Hub client's retries.

    Raises:
        [`ModelNotFoundError`] (a `FileNotFoundError` and a `ValueError`): a local folder that does not exist or holds no saved model (see
            [`check_saved_model_folder`]).
        [`UnavailableError`]: not a local folder and the Hub cannot be reached or has no such model.
    """
    text = os.fspath(value)
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(os.path.normpath(Path(base_dir) / path))
    where = f" (relative paths are resolved against {str(base_dir)!r})" if base_dir is not None else ""
    if path.is_dir():
        return str(check_saved_model_folder(path, argument))
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(path)  # a GGUF checkpoint (dequantized on loading, see utils.loading)
    if path.exists():
        raise ModelNotFoundError(f"{argument}={text!r}: {str(path)!r} is a file, not a saved model folder.")
    if not looks_like_hub_id(text):
        raise ModelNotFoundError(f"{argument}={text!r}: no model folder at {str(path)!r}{where}.")
    _check_hub_model(text, argument, f"no local folder at {str(path)!r}{where}")
    return text


def _check_hub_model(repo_id: str, argument: str, local_note: str) -> None:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str) and os.path.isfile(cached):
        return
    if constants.HF_HUB_OFFLINE:
        raise UnavailableError(
            f"{argument}={repo_id!r}: {local_note}, and as a Hub name it is not in the local cache (HF_HUB_OFFLINE "
            "is set). Give the path of a saved model folder."
        )
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(repo_id, timeout=10)
    except GatedRepoError:
        return  # exists; from_pretrained will say what the token needs
    except RepositoryNotFoundError:
        raise UnavailableError(
            f"{argument}={repo_id!r}: {local_note}, and the Hugging Face Hub has no model of that name (or it is "
            "private). Check the path or the name."
        ) from None
    except Exception as err:  # no network: connection / DNS / timeout errors of the HTTP client
        raise UnavailableError(
            f"{argument}={repo_id!r}: {local_note}, and the Hugging Face Hub could not be reached to look it up as a "
            f"model name ({type(err).__name__}). Give the path of a saved model folder, or connect to the network."
        ) from None


__all__ = ["check_saved_model_folder", "checkpoint_folders", "looks_like_hub_id", "resolve_model_source"]
