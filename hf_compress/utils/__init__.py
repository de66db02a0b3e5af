from .imports import (
    is_bitsandbytes_available,
    is_deepspeed_available,
    is_peft_available,
    is_torchao_available,
    require_backend,
)
from .modules import LINEAR_TYPES, count_parameters, find_linear_modules, name_matches, unwrap_model

__all__ = [
    "LINEAR_TYPES",
    "count_parameters",
    "find_linear_modules",
    "is_bitsandbytes_available",
    "is_deepspeed_available",
    "is_peft_available",
    "is_torchao_available",
    "name_matches",
    "require_backend",
    "unwrap_model",
]
