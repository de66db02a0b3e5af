"""Property-based tests (hypothesis) over every config class and entry point: an invalid value of one field (or a
pair of fields that conflict) raises ValueError or TypeError naming that field, before any work; valid values
construct. The strategies live in tests/validation_specs.py; tests/scripts/fuzz_validation.py counts outcomes over
many more examples. Example counts are bounded so the file runs in well under a minute."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from tiny_models import tiny_llama
from validation_specs import all_targets, classify

from hf_compress.utils.validation import InvalidArgumentTypeError

INVALID_EXAMPLES = 25
VALID_EXAMPLES = 8
_SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("validation")
    model_dir = tmp / "llama"
    tiny_llama().save_pretrained(model_dir)
    return {target.name: target for target in all_targets(str(tmp), tiny_llama, str(model_dir))}


NAMES = [
    "DistillationConfig",
    "PruningConfig",
    "StructuredPruningConfig",
    "QATConfig",
    "QATCallback",
    "PruningCallback",
    "GracefulShutdownCallback",
    "PostTrainingQuantizationCallback",
    "quantize_model",
    "find_lora_target_modules",
    "prepare_qlora",
    "load_qlora_model",
    "merge_qlora",
]


@pytest.mark.parametrize("name", NAMES)
def test_invalid_values_fail_cleanly_naming_the_field(targets, name):
    target = targets[name]

    @settings(max_examples=INVALID_EXAMPLES, **_SETTINGS)
    @given(case=target.invalid())
    def check(case):
        field, kwargs = case
        assert classify(target, field, kwargs) == "clean", (field, kwargs)

    check()


@pytest.mark.parametrize("name", [n for n in NAMES if n != "merge_qlora"])  # merges: tests/test_qlora.py
def test_valid_values_construct(targets, name):
    target = targets[name]
    examples = VALID_EXAMPLES if target.max_valid is None else min(VALID_EXAMPLES, target.max_valid)

    @settings(max_examples=examples, **_SETTINGS)
    @given(kwargs=target.valid_kwargs())
    def check(kwargs):
        target.call(kwargs)

    check()


def test_wrong_types_are_type_errors_that_are_also_value_errors():
    from hf_compress import PruningConfig, StructuredPruningConfig

    with pytest.raises(TypeError, match="layers_to_drop=0 is not allowed"):
        StructuredPruningConfig(layers_to_drop=0)
    with pytest.raises(ValueError, match="layers_to_drop"):  # callers catching ValueError still do
        StructuredPruningConfig(layers_to_drop=0)
    with pytest.raises(InvalidArgumentTypeError, match="jsd_beta=None is not allowed: it must be a number"):
        from hf_compress import DistillationConfig

        DistillationConfig(output_dir="unused", jsd_beta=None, report_to="none")
    with pytest.raises(ValueError, match=r"start_step=True is not allowed: it must be an integer >= 0"):
        PruningConfig(start_step=True)


def test_quantize_model_class_and_device_map_errors_are_clean():
    from hf_compress import quantize_model

    model = tiny_llama()
    with pytest.raises(TypeError, match="model_class='AutoModel' is not allowed"):
        quantize_model(model, "torchao-int8", model_class="AutoModel")
    with pytest.raises(ValueError, match="device_map='gpu' is not allowed"):
        quantize_model(model, "torchao-int8", device_map="gpu")
    with pytest.raises(TypeError, match="device_map=3.5 is not allowed"):
        quantize_model(model, "torchao-int8", device_map=3.5)
    with pytest.raises(ValueError, match="device_map=.*'nope'"):
        quantize_model(model, "torchao-int8", device_map={"": "nope"})
