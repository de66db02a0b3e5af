"""One vocabulary for `task` arguments: hf_compress's names, PEFT's `TaskType` values and transformers' pipeline
task names all mean the same task everywhere in the library.

| hf_compress (canonical)   | PEFT `TaskType`        | pipeline task names                                     |
|---------------------------|------------------------|---------------------------------------------------------|
| `causal-lm`               | `CAUSAL_LM`            | `text-generation`                                       |
| `sequence-classification` | `SEQ_CLS`              | `text-classification`, `sentiment-analysis`             |
| `token-classification`    | `TOKEN_CLS`            | `token-classification`, `ner`                           |
| `question-answering`      | `QUESTION_ANS`         | `question-answering`                                    |
| `seq2seq-lm`              | `SEQ_2_SEQ_LM`         | `text2text-generation`, `summarization`, `translation`  |
| `feature-extraction`      | `FEATURE_EXTRACTION`   | `feature-extraction`                                    |

Spellings are case-insensitive and `_` equals `-`, so `"CAUSAL_LM"`, `peft.TaskType.CAUSAL_LM`, `"causal_lm"` and
`"text-generation"` are all `"causal-lm"`. `"classification"` (the name the reports and metrics used) is
`"sequence-classification"`.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable

CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"
TOKEN_CLASSIFICATION = "token-classification"
QUESTION_ANSWERING = "question-answering"
SEQ2SEQ_LM = "seq2seq-lm"
FEATURE_EXTRACTION = "feature-extraction"

# canonical name -> (PEFT TaskType member, other accepted spellings: pipeline task names, older names)
TASK_SPELLINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    CAUSAL_LM: ("CAUSAL_LM", ("text-generation",)),
    SEQUENCE_CLASSIFICATION: ("SEQ_CLS", ("text-classification", "sentiment-analysis", "classification")),
    TOKEN_CLASSIFICATION: ("TOKEN_CLS", ("ner",)),
    QUESTION_ANSWERING: ("QUESTION_ANS", ()),
    SEQ2SEQ_LM: ("SEQ_2_SEQ_LM", ("text2text-generation", "summarization", "translation", "seq2seq")),
    FEATURE_EXTRACTION: ("FEATURE_EXTRACTION", ()),
}


def _key(value: str) -> str:
    return value.strip().lower().replace("_", "-")


_ALIASES: dict[str, str] = {}
for _canonical, (_peft, _others) in TASK_SPELLINGS.items():
    for _spelling in (_canonical, _peft, *_others):
        _ALIASES[_key(_spelling)] = _canonical


def peft_task_type(task: str) -> str:
    """The PEFT `TaskType` member name of a task (`"causal-lm"` -> `"CAUSAL_LM"`)."""
    return TASK_SPELLINGS[normalize_task(task)][0]


def normalize_task(
    task: str | enum.Enum,
    allowed: Iterable[str] | None = None,
    *,
    argument: str = "task",
    extra: Iterable[str] = (),
) -> str:
    """The canonical hf_compress name of `task`, in any accepted spelling (see the module docstring).

    Args:
        task (`str` or `enum.Enum`): e.g. `"causal-lm"`, `"CAUSAL_LM"`, `peft.TaskType.SEQ_CLS`,
            `"text-classification"`.
        allowed (`Iterable[str]`, *optional*): the canonical tasks the caller supports (default: all).
        argument (`str`, *optional*, defaults to `"task"`): the argument name used in errors.
        extra (`Iterable[str]`, *optional*): other values the caller accepts as they are (e.g. `"auto"`).

    Raises:
        `ValueError` naming the argument, the value and the allowed tasks (with a "did you mean"); a value that is
        not a string is an `InvalidArgumentTypeError` (a `TypeError` that is also a `ValueError`).

    >>> normalize_task("text-classification")
    'sequence-classification'
    >>> normalize_task("CAUSAL_LM")
    'causal-lm'
    """
    extra = tuple(extra)
    allowed = tuple(allowed) if allowed is not None else tuple(TASK_SPELLINGS)
    value = task.value if isinstance(task, enum.Enum) else task
    if not isinstance(value, str):
        from .validation import InvalidArgumentTypeError

        raise InvalidArgumentTypeError(
            f"{argument}={task!r} is not allowed: it must be a task name (a string, or PEFT's TaskType), got "
            f"{type(task).__name__}."
        )
    if isinstance(value, str):
        if _key(value) in {_key(e) for e in extra}:
            return next(e for e in extra if _key(e) == _key(value))
        canonical = _ALIASES.get(_key(value))
        if canonical in allowed:
            return canonical
    spellings = [s for c in allowed for s in (c, TASK_SPELLINGS[c][0], *TASK_SPELLINGS[c][1])]
    names = [repr(e) for e in extra]
    for c in allowed:
        names.append(f"{c!r} (also {', '.join(repr(s) for s in (TASK_SPELLINGS[c][0], *TASK_SPELLINGS[c][1]))})")
    hint = ""
    if isinstance(value, str):
        if _ALIASES.get(_key(value)) is not None:
            hint = f" {value!r} means {_ALIASES[_key(value)]!r}, which is not supported here."
        else:
            close = difflib.get_close_matches(_key(value), [_key(s) for s in list(extra) + spellings], n=1)
            if close:
                hint = f" Did you mean {(_ALIASES.get(close[0]) or close[0])!r}?"
    raise ValueError(f"{argument}={task!r} is not supported; allowed: {', '.join(names)}.{hint}")


__all__ = [
    "CAUSAL_LM",
    "FEATURE_EXTRACTION",
    "QUESTION_ANSWERING",
    "SEQ2SEQ_LM",
    "SEQUENCE_CLASSIFICATION",
    "TASK_SPELLINGS",
    "TOKEN_CLASSIFICATION",
    "normalize_task",
    "peft_task_type",
]
