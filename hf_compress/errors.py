"""The library's own exception types, in one place so every layer (methods, recipes, the command line) imports them
from here and from nowhere else.

Bad arguments are plain `ValueError` / `TypeError` naming the argument, the value and what is allowed; an output
folder that would be overwritten is a `FileExistsError` ([`hf_compress.utils.output`]). The types below add what
the built-in ones cannot say.
"""

from __future__ import annotations


class UnavailableError(RuntimeError):
    """A model or dataset that was asked for could not be loaded (no network, wrong name)."""


class ModelNotFoundError(FileNotFoundError, ValueError):
    """A model folder that does not exist or holds no saved model (a `FileNotFoundError`, and a `ValueError` like
    every other bad argument); the message names the argument and the path."""


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the stage (index and name) and the field."""


__all__ = ["ModelNotFoundError", "RecipeError", "UnavailableError"]
