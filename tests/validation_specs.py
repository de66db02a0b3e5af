"""What counts as a valid and an invalid value of every field of every config class and entry point, as hypothesis
strategies: used by tests/test_validation_properties.py (bounded, in CI) and tests/scripts/fuzz_validation.py
(counts, for the report). An invalid input changes one field (or one pair of fields that only conflict together)
of an otherwise valid call; it must raise ValueError or TypeError naming that field. A valid input must construct.
"""

from __future__ import annotations

import inspect
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

NAN, INF = math.nan, math.inf
# A file where a folder is expected: created once per process.
_FILE = Path(tempfile.mkdtemp(prefix="hf_compress_specs_")) / "a_file.txt"
_FILE.write_text("user data")
EXISTING_FILE = str(_FILE)


# ------------------------------------------------------------------------------------------- bad-value pools
def bad_number(low=None, high=None, low_inclusive=True, high_inclusive=True, allow_none=False):
    wrong = [NAN, INF, -INF, "0.5", True, False, [0.5], {"x": 1}, b"1"]
    if not allow_none:
        wrong.append(None)
    options = [st.sampled_from(wrong)]
    if low is not None:
        options.append(st.floats(max_value=low, exclude_max=low_inclusive, allow_nan=False, allow_infinity=False))
    if high is not None:
        options.append(st.floats(min_value=high, exclude_min=high_inclusive, allow_nan=False, allow_infinity=False))
    return st.one_of(options)


def bad_int(low=None, high=None, allow_none=False):
    wrong = [1.5, "3", True, False, NAN, [1], {"x": 1}, 2.0]
    if not allow_none:
        wrong.append(None)
    options = [st.sampled_from(wrong)]
    if low is not None:
        options.append(st.integers(max_value=low - 1, min_value=low - 10**6))
    if high is not None:
        options.append(st.integers(min_value=high + 1, max_value=high + 10**6))
    return st.one_of(options)


def bad_choice(allowed, allow_none=False):
    wrong = [3, 2.5, True, ["x"], {"x": 1}, b"x", ("a",)]
    if not allow_none:
        wrong.append(None)
    return st.one_of(st.sampled_from(wrong), st.text(max_size=12).filter(lambda t: t not in allowed))


def bad_task(allowed, allow_none=False):
    """Like `bad_choice`, without the other spellings `normalize_task` accepts (`SEQ_CLS`, `text-generation`, ...)."""
    from hf_compress.utils.tasks import TASK_SPELLINGS, normalize_task

    def accepted(value) -> bool:
        try:
            normalize_task(
                value,
                [a for a in allowed if a in TASK_SPELLINGS],
                extra=[a for a in allowed if a not in TASK_SPELLINGS],
            )
        except ValueError:
            return False
        return True

    return bad_choice(allowed, allow_none).filter(lambda v: not accepted(v))


BAD_BOOL = st.sampled_from([None, "yes", "False", 1, 0, 1.0, [], [True]])
BAD_PATTERNS = st.sampled_from([3, [3], [None], ["q_proj", 1], {"q_proj": 1}, 2.5, True, b"q_proj"])
BAD_NAMES = st.sampled_from(["lm_head", 3, [3], [None], {"a": 1}, True])  # lists of module names
BAD_OUTPUT_FOLDER = st.sampled_from([EXISTING_FILE, 3, [], "", 2.5, True])
BAD_INT_LIST = st.sampled_from([0, 3, "1,2", "12", [1.5], [-1], [True], {"a": 1}, [None], 2.5, [1, "2"]])


def valid_patterns(names=("q_proj", "v_proj", "fc1")):
    return st.one_of(st.none(), st.sampled_from(names), st.lists(st.sampled_from(names), min_size=1, max_size=3))


# ------------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    """A config class or a function: `call(kwargs)` builds / calls it; `fields` maps a field to its bad values;
    `conflicts` are (field named by the error, kwargs) pairs that are only invalid together; `valid` draws kwargs
    that must be accepted."""

    name: str
    call: Callable[[dict], Any]
    valid: st.SearchStrategy
    fields: dict[str, st.SearchStrategy]
    conflicts: list[tuple[str, dict]] = field(default_factory=list)
    base: dict = field(default_factory=dict)  # kwargs added to every invalid call (a valid context)
    signature_of: Callable | None = None  # to drop fields an older version does not have
    max_valid: int | None = None  # cap on valid examples (slow calls)

    def known_fields(self) -> dict[str, st.SearchStrategy]:
        if self.signature_of is None:
            return self.fields
        try:
            names = set(inspect.signature(self.signature_of).parameters)
        except (TypeError, ValueError):
            return self.fields
        return {k: v for k, v in self.fields.items() if k in names}

    def valid_kwargs(self) -> st.SearchStrategy:
        """`valid`, without fields an older version does not have (to measure it with the same inputs)."""
        known = set(self.known_fields()) | set(self.base)
        if self.signature_of is None:
            return self.valid
        return self.valid.map(lambda kwargs: {k: v for k, v in kwargs.items() if k in known})

    def invalid(self) -> st.SearchStrategy:
        """`(field, kwargs)` with one bad field (or one conflicting pair)."""
        fields = self.known_fields()
        single = st.sampled_from(sorted(fields)).flatmap(
            lambda name: fields[name].map(lambda value, name=name: (name, {**self.base, name: value}))
        )
        if not self.conflicts:
            return single
        pairs = st.sampled_from(self.conflicts).map(lambda c: (c[0], {**self.base, **c[1]}))
        return st.one_of(single, pairs)


def _distillation_target(tmp: str) -> Target:
    from hf_compress import DistillationConfig
    from hf_compress.distillation import config as config_module
    from hf_compress.distillation.config import TASKS

    NONFINITE_POLICIES = getattr(config_module, "NONFINITE_POLICIES", ("raise",))  # noqa: N806
    from hf_compress.distillation.losses import HIDDEN_LOSS_TYPES, LOSS_TYPES

    def call(kwargs):
        kwargs = {"output_dir": tmp, "report_to": "none", **kwargs}
        return DistillationConfig(**kwargs)

    valid = st.fixed_dictionaries(
        {
            "temperature": st.floats(min_value=1e-3, max_value=100),
            "alpha": st.floats(min_value=0, max_value=1),
            "loss_type": st.sampled_from(LOSS_TYPES),
            "jsd_beta": st.floats(min_value=0, max_value=1),
            "task": st.sampled_from(TASKS),
            "hidden_loss_weight": st.floats(min_value=0, max_value=10),
            "hidden_loss_type": st.sampled_from(HIDDEN_LOSS_TYPES),
            "hidden_layer_mapping": st.one_of(st.none(), st.lists(st.integers(0, 12), min_size=1, max_size=4)),
            "teacher_model_init_kwargs": st.sampled_from([None, {"dtype": "float32"}, '{"dtype": "bfloat16"}']),
            "nonfinite": st.sampled_from(NONFINITE_POLICIES),
        }
    )
    fields = {
        "temperature": bad_number(low=0, low_inclusive=False),
        "alpha": bad_number(0, 1),
        "loss_type": bad_choice(LOSS_TYPES),
        "jsd_beta": bad_number(0, 1),
        "task": bad_task(TASKS),
        "hidden_loss_weight": bad_number(low=0),
        "hidden_loss_type": bad_choice(HIDDEN_LOSS_TYPES),
        "hidden_layer_mapping": st.one_of(BAD_INT_LIST, st.just([])),
        "teacher_model_init_kwargs": st.sampled_from([3, "{not json", "[1, 2]", ["dtype"], 2.5, True]),
        "nonfinite": bad_choice(NONFINITE_POLICIES),
        "output_dir": st.sampled_from([EXISTING_FILE]),
    }
    return Target("DistillationConfig", call, valid, fields, signature_of=DistillationConfig)


@st.composite
def _valid_pruning(draw):
    from hf_compress.pruning.scoring import available_scorers

    pattern = draw(st.sampled_from(["unstructured", "2:4", "4:8", "1:4"]))
    kwargs: dict[str, Any] = {"pattern": pattern, "method": draw(st.sampled_from(available_scorers()))}
    if pattern == "unstructured":
        sparsity = draw(st.one_of(st.none(), st.floats(min_value=0, max_value=0.99)))
        kwargs["scope"] = draw(st.sampled_from(["layer", "global"]))
    else:
        n, m = map(int, pattern.split(":"))
        sparsity = draw(st.sampled_from([None, 1 - n / m]))
    kwargs["sparsity"] = sparsity
    target = 0.5 if sparsity is None else sparsity
    if pattern != "unstructured":
        target = 1 - n / m
    kwargs["initial_sparsity"] = draw(st.floats(min_value=0, max_value=target))
    kwargs["schedule"] = schedule = draw(st.sampled_from(["oneshot", "linear", "cubic"]))
    kwargs["start_step"] = start = draw(st.integers(0, 50))
    if schedule != "oneshot" or draw(st.booleans()):
        kwargs["end_step"] = draw(st.integers(start, start + 100))
    kwargs["frequency"] = draw(st.integers(1, 20))
    kwargs["num_calibration_batches"] = draw(st.integers(1, 16))
    kwargs["target_modules"] = draw(valid_patterns())
    kwargs["exclude_modules"] = draw(valid_patterns())
    return kwargs


def _pruning_target() -> Target:
    from hf_compress import PruningConfig
    from hf_compress.pruning.scoring import available_scorers

    fields = {
        "method": bad_choice(available_scorers()),
        "sparsity": bad_number(0, 1, high_inclusive=False, allow_none=True),
        "scope": bad_choice(["layer", "global"]),
        "pattern": st.one_of(
            st.sampled_from([3, None, ["2:4"], "3:2", "2:0", "0:4", "two-four", "2:4:8", " :4", True]),
            st.text(max_size=8).filter(lambda t: t != "unstructured" and ":" not in t),
        ),
        "target_modules": BAD_PATTERNS,
        "exclude_modules": BAD_PATTERNS,
        "schedule": bad_choice(["oneshot", "linear", "cubic"]),
        "initial_sparsity": bad_number(0, 1, high_inclusive=False),
        "start_step": bad_int(low=0),
        "end_step": bad_int(allow_none=True),
        "frequency": bad_int(low=1),
        "num_calibration_batches": bad_int(low=1),
    }
    conflicts = [
        ("sparsity", {"pattern": "2:4", "sparsity": 0.3}),
        ("scope", {"pattern": "2:4", "scope": "global"}),
        ("initial_sparsity", {"sparsity": 0.5, "initial_sparsity": 0.8}),
        ("end_step", {"schedule": "linear"}),
        ("end_step", {"schedule": "cubic", "start_step": 10, "end_step": 5}),
    ]
    return Target("PruningConfig", lambda kw: PruningConfig(**kw), _valid_pruning(), fields, conflicts)


@st.composite
def _valid_structured(draw):
    kwargs: dict[str, Any] = {}
    if draw(st.booleans()):
        kwargs["ffn_pruning_ratio"] = draw(st.floats(min_value=0, max_value=0.99))
    else:
        kwargs["target_intermediate_size"] = draw(st.one_of(st.none(), st.integers(1, 4096)))
    if draw(st.booleans()):
        kwargs["num_heads_to_prune"] = draw(st.integers(0, 16))
    else:
        kwargs["target_num_heads"] = draw(st.one_of(st.none(), st.integers(1, 32)))
    if draw(st.booleans()):
        kwargs["layers_to_drop"] = draw(st.one_of(st.none(), st.lists(st.integers(0, 40), max_size=5, unique=True)))
    else:
        kwargs["num_layers_to_drop"] = draw(st.integers(0, 12))
    kwargs["importance"] = draw(st.sampled_from(["l2", "l1", "activation"]))
    kwargs["layer_importance"] = draw(st.sampled_from(["evenly_spaced", "block_influence"]))
    kwargs["num_calibration_batches"] = draw(st.integers(1, 32))
    return kwargs


def _structured_target() -> Target:
    from hf_compress import StructuredPruningConfig

    fields = {
        "ffn_pruning_ratio": bad_number(0, 1, high_inclusive=False),
        "target_intermediate_size": bad_int(low=1, allow_none=True),
        "num_heads_to_prune": bad_int(low=0),
        "target_num_heads": bad_int(low=1, allow_none=True),
        "layers_to_drop": st.one_of(BAD_INT_LIST, st.just([2, 2])),
        "num_layers_to_drop": bad_int(low=0),
        "importance": bad_choice(["l2", "l1", "activation"]),
        "layer_importance": bad_choice(["evenly_spaced", "block_influence"]),
        "num_calibration_batches": bad_int(low=1),
    }
    conflicts = [
        ("target_intermediate_size", {"ffn_pruning_ratio": 0.5, "target_intermediate_size": 64}),
        ("target_num_heads", {"num_heads_to_prune": 2, "target_num_heads": 4}),
        ("num_layers_to_drop", {"layers_to_drop": [1], "num_layers_to_drop": 1}),
    ]
    return Target(
        "StructuredPruningConfig", lambda kw: StructuredPruningConfig(**kw), _valid_structured(), fields, conflicts
    )


def _qat_fields():
    from hf_compress.quantization.config import QAT_SCHEMES

    return {
        "scheme": bad_choice(list(QAT_SCHEMES)),
        "group_size": bad_int(low=2, allow_none=True),
        "target_modules": BAD_PATTERNS,
        "exclude_modules": BAD_PATTERNS,
    }


def _qat_valid():
    from hf_compress.quantization.config import QAT_SCHEMES

    return st.fixed_dictionaries(
        {
            "scheme": st.sampled_from(sorted(QAT_SCHEMES)),
            "group_size": st.one_of(st.none(), st.integers(2, 256)),
            "target_modules": valid_patterns(),
            "exclude_modules": valid_patterns(),
        }
    )


def _qat_config_target() -> Target:
    from hf_compress import QATConfig

    return Target("QATConfig", lambda kw: QATConfig(**kw), _qat_valid(), _qat_fields())


def _qat_callback_target() -> Target:
    from hf_compress import QATCallback

    fields = {
        **_qat_fields(),
        "start_step": bad_int(low=0),
        "output_dir": BAD_OUTPUT_FOLDER,
        "save_quantized": BAD_BOOL,
        "overwrite": BAD_BOOL,
    }
    valid = st.tuples(
        _qat_valid(),
        st.fixed_dictionaries(
            {
                "start_step": st.integers(0, 1000),
                "output_dir": st.sampled_from([None, "quantized", "/tmp/hf_compress_q"]),
                "save_quantized": st.booleans(),
                "overwrite": st.booleans(),
            }
        ),
    ).map(lambda pair: {**pair[0], **pair[1]})
    return Target("QATCallback", lambda kw: QATCallback(**kw), valid, fields, signature_of=QATCallback)


def _pruning_callback_target() -> Target:
    import torch

    from hf_compress import PruningCallback, PruningConfig

    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long)}
    fields = {
        "config": st.sampled_from([3, "magnitude", [0.5], None, 2.5, {"nope": 1}, {"sparsity": 0.5, "scopee": "x"}]),
        "calibration_data": st.sampled_from(["text", batch, 3, torch.ones(2, 4), b"x", 2.5]),
        "calibration_key": st.sampled_from([3, [], "", 2.5]),
    }
    valid = st.fixed_dictionaries(
        {
            "config": st.one_of(_valid_pruning().map(lambda kw: PruningConfig(**kw)), _valid_pruning()),
            "calibration_data": st.just([batch]),
        }
    )
    return Target("PruningCallback", lambda kw: PruningCallback(**kw), valid, fields, base={"config": PruningConfig()})


def _shutdown_target() -> Target:
    from hf_compress import GracefulShutdownCallback

    fields = {
        "signals": st.sampled_from(["SIGFOO", 99999, [None], ["SIGKILL"], "SIGSTOP", [], 2.5, [True], {"SIGTERM": 1}]),
        "exit_code": bad_int(low=0, high=255, allow_none=True),
        "exit_process": BAD_BOOL,
    }
    valid = st.fixed_dictionaries(
        {
            "signals": st.sampled_from([("SIGTERM",), ["SIGUSR1"], "TERM", 15, ["SIGTERM", "SIGUSR1", "SIGUSR2"]]),
            "exit_code": st.one_of(st.none(), st.integers(0, 255)),
            "exit_process": st.booleans(),
        }
    )
    return Target("GracefulShutdownCallback", lambda kw: GracefulShutdownCallback(**kw), valid, fields)


PTQ_OPTION_FIELDS = {
    "compute_dtype": st.one_of(bad_choice(["float32", "bfloat16", "float16", "torch.float32"]), st.just("int8")),
    "double_quant": BAD_BOOL,
    "llm_int8_threshold": bad_number(low=0, low_inclusive=False),
    "group_size": bad_int(low=2),
    "skip_modules": BAD_NAMES,
}


def _ptq_options_valid():
    return st.fixed_dictionaries(
        {
            "compute_dtype": st.sampled_from(["float32", "bfloat16", "float16", "torch.bfloat16"]),
            "double_quant": st.booleans(),
            "llm_int8_threshold": st.floats(min_value=0.1, max_value=20),
            "group_size": st.sampled_from([2, 4, 8, 16, 32]),
            "skip_modules": st.sampled_from([None, ["lm_head"], ["lm_head", "model.layers.0.mlp"]]),
        }
    )


def _ptq_callback_target() -> Target:
    from hf_compress import PostTrainingQuantizationCallback
    from hf_compress.quantization.ptq import PTQ_METHODS

    fields = {
        "method": bad_choice(sorted(PTQ_METHODS)),
        "prefix": st.sampled_from([3, "has space", "1abc", [], "a-b"]),
        "compute_metrics": st.sampled_from([3, "accuracy", [len]]),
        "evaluate": BAD_BOOL,
        "save_full_precision": BAD_BOOL,
        **PTQ_OPTION_FIELDS,
    }
    valid = st.tuples(
        st.fixed_dictionaries(
            {
                # torchao-int4-cuda needs a CUDA GPU and its own group sizes: tests/test_serve_fast.py covers it.
                "method": st.sampled_from(sorted(m for m in PTQ_METHODS if m != "torchao-int4-cuda")),
                "prefix": st.sampled_from([None, "ptq", "int4_model"]),
                "evaluate": st.booleans(),
                "save_full_precision": st.booleans(),
            }
        ),
        _ptq_options_valid(),
    ).map(lambda pair: {**pair[0], **pair[1]})
    return Target("PostTrainingQuantizationCallback", lambda kw: PostTrainingQuantizationCallback(**kw), valid, fields)


def _quantize_model_target(model_factory: Callable[[], Any]) -> Target:
    from hf_compress import quantize_model
    from hf_compress.quantization.ptq import PTQ_METHODS

    def call(kwargs):
        kwargs = dict(kwargs)
        model = kwargs.pop("model_or_path", None)
        return quantize_model(model if model is not None else model_factory(), **kwargs)

    fields = {
        "model_or_path": st.sampled_from([3, "/nonexistent/model", EXISTING_FILE, [1], 2.5, str(_FILE.parent)]),
        "method": bad_choice(sorted(PTQ_METHODS)),
        "model_class": st.sampled_from([3, "AutoModel", int, len, [1]]),
        "device_map": st.sampled_from(["gpu", 3.5, {"": "nope"}, {3: "cpu"}, [0], "cuda:x", -1, True]),
        "output_dir": st.sampled_from([EXISTING_FILE, 3, [], 2.5]),
        "processing_class": st.sampled_from([3, "tokenizer", [1]]),
        "overwrite": BAD_BOOL,
        **PTQ_OPTION_FIELDS,
    }
    valid = st.tuples(
        st.sampled_from(["torchao-int8", "torchao-int4", "nf4"]),
        _ptq_options_valid().map(lambda d: {**d, "skip_modules": None}),
        st.sampled_from([None, "cpu", {"": "cpu"}]),
    ).map(lambda t: {"method": t[0], **t[1], "device_map": t[2]})
    return Target("quantize_model", call, valid, fields, max_valid=3)


def _find_targets_target(model_factory) -> Target:
    from hf_compress import find_lora_target_modules

    def call(kwargs):
        kwargs = dict(kwargs)
        model = kwargs.pop("model", None)
        return find_lora_target_modules(model if model is not None else model_factory(), **kwargs)

    fields = {
        "model": st.sampled_from([3, "model", [1], 2.5]),
        "target_modules": BAD_PATTERNS,
        "exclude_modules": BAD_PATTERNS,
    }
    valid = st.fixed_dictionaries(
        {
            "target_modules": st.sampled_from(["all-linear", None, "q_proj", ["q_proj", "v_proj"], ".*mlp.*"]),
            "exclude_modules": st.sampled_from([None, "k_proj", ["o_proj"]]),
        }
    )
    return Target("find_lora_target_modules", call, valid, fields)


QLORA_TASKS = [
    "causal-lm",
    "sequence-classification",
    "token-classification",
    "question-answering",
    "seq2seq-lm",
    "feature-extraction",
]
LORA_FIELDS = {
    "lora_r": bad_int(low=1),
    "lora_alpha": bad_number(low=0, low_inclusive=False, allow_none=True),
    "lora_dropout": bad_number(0, 1, high_inclusive=False),
    "target_modules": BAD_PATTERNS,
    "exclude_modules": BAD_PATTERNS,
    "modules_to_save": BAD_NAMES,
    "gradient_checkpointing": BAD_BOOL,
    "loftq": BAD_BOOL,
    "lora_kwargs": st.sampled_from([3, [1], {"r": 4}, {"nope": 1}, {"use_dorra": True}, {1: 2}, "use_dora"]),
}


def _lora_valid():
    return st.fixed_dictionaries(
        {
            "lora_r": st.integers(1, 16),
            "lora_alpha": st.one_of(st.none(), st.floats(min_value=0.5, max_value=64)),
            "lora_dropout": st.floats(min_value=0, max_value=0.5),
            "target_modules": st.sampled_from(["all-linear", "q_proj", ["q_proj", "v_proj"]]),
            "gradient_checkpointing": st.booleans(),
            "lora_kwargs": st.sampled_from([None, {"use_rslora": True}, {"bias": "none"}]),
        }
    )


def _prepare_qlora_target(model_factory) -> Target:
    from hf_compress import prepare_qlora

    def call(kwargs):
        kwargs = dict(kwargs)
        model = kwargs.pop("model", None)
        return prepare_qlora(model if model is not None else model_factory(), **kwargs)

    fields = {
        "model": st.sampled_from([3, "model", [1]]),
        "task": bad_task(QLORA_TASKS, allow_none=True),
        "loftq_model_path": st.sampled_from([3, [], 2.5]),
        **LORA_FIELDS,
    }
    valid = _lora_valid().map(lambda d: {**d, "task": "causal-lm"})
    return Target("prepare_qlora", call, valid, fields, max_valid=6)


def _load_qlora_target(model_dir: str) -> Target:
    from hf_compress import load_qlora_model

    def call(kwargs):
        kwargs = {"load_in_4bit": False, **kwargs}
        path = kwargs.pop("model_name_or_path", model_dir)
        return load_qlora_model(path, **kwargs)

    fields = {
        "model_name_or_path": st.sampled_from([3, "/nonexistent/model", EXISTING_FILE, "", [1]]),
        "task": bad_task(QLORA_TASKS),
        "load_in_4bit": BAD_BOOL,
        "load_in_8bit": BAD_BOOL,
        "bnb_4bit_quant_type": bad_choice(["nf4", "fp4"]),
        "bnb_4bit_use_double_quant": BAD_BOOL,
        "bnb_4bit_compute_dtype": st.sampled_from(["int8", 3, "bool", [1], "torch.int4", True, "floatt"]),
        "num_labels": bad_int(low=1, allow_none=True),
        "device_map": st.sampled_from(["gpu", 3.5, {"": "nope"}, [0], True]),
        **LORA_FIELDS,
    }
    valid = _lora_valid().map(lambda d: {**d, "task": "causal-lm", "bnb_4bit_compute_dtype": "float32"})
    return Target("load_qlora_model", call, valid, fields, max_valid=3)


def _merge_qlora_target(tmp: str) -> Target:
    from hf_compress import merge_qlora

    counter = iter(range(10**9))

    def call(kwargs):
        kwargs = dict(kwargs)
        source = kwargs.pop("model_or_adapter_path", "/nonexistent/adapter")
        return merge_qlora(source, f"{tmp}/merged-{next(counter)}", **kwargs)

    fields = {
        "model_or_adapter_path": st.sampled_from([3, [1], 2.5, None]),
        "requantize": bad_choice(["nf4", "int8"], allow_none=True),
        "base_model_name_or_path": st.sampled_from([3, "/nonexistent/base", EXISTING_FILE, [1]]),
        "dequantize_base": BAD_BOOL,
        "dtype": st.sampled_from(["int8", 3, "bool", [1], True, "bfloat"]),
        "compute_metrics": st.sampled_from([3, "accuracy", [len]]),
        "data_collator": st.sampled_from([3, "default", [len]]),
        "eval_batch_size": bad_int(low=1),
        "overwrite": BAD_BOOL,
        "model_kwargs": st.sampled_from([3, [1], "num_labels=2", {1: 2}]),
    }
    # Valid merges need a trained adapter; tests/test_qlora.py runs them. Here: invalid arguments only.
    return Target("merge_qlora", call, st.nothing(), fields, max_valid=0)


def all_targets(tmp: str, model_factory: Callable[[], Any], model_dir: str) -> list[Target]:
    """Every config class and entry point, with `tmp` a scratch folder, `model_factory()` a fresh tiny model with
    Linear layers of width 32 and `model_dir` that model saved."""
    builders = [
        lambda: _distillation_target(tmp),
        _pruning_target,
        _structured_target,
        _qat_config_target,
        _qat_callback_target,
        _pruning_callback_target,
        _shutdown_target,
        _ptq_callback_target,
        lambda: _quantize_model_target(model_factory),
        lambda: _find_targets_target(model_factory),
        lambda: _prepare_qlora_target(model_factory),
        lambda: _load_qlora_target(model_dir),
        lambda: _merge_qlora_target(tmp),
    ]
    targets = []
    for build in builders:
        try:
            targets.append(build())
        except ImportError:  # a name an older version does not have (for before/after measurements)
            continue
    return targets


def classify(target: Target, field_name: str, kwargs: dict) -> str:
    """`clean` (ValueError/TypeError naming the field), `unclear` (naming another or none), `wrong-type` (another
    exception), `accepted` (no exception) for an invalid call."""
    try:
        target.call(kwargs)
    except (ValueError, TypeError) as err:
        return "clean" if field_name in str(err) else "unclear"
    except Exception:  # noqa: BLE001 - the outcome being measured
        return "wrong-type"
    return "accepted"
