"""hf_compress: knowledge distillation, pruning and quantization inside ordinary Hugging Face Trainer runs.

Public names are imported lazily, so `import hf_compress` stays fast and optional backends (bitsandbytes,
torchao) are only imported by the features that need them.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ._quiet import install_backend_warning_filters

__version__ = "0.1.0"

# Before anything imports torchao / bitsandbytes: drop the import-time lines a user cannot act on (see _quiet.py).
install_backend_warning_filters()

# public name -> submodule that defines it
_IMPORT_STRUCTURE: dict[str, list[str]] = {
    "distillation.config": ["DistillationConfig"],
    "distillation.trainer": ["DistillationTrainer"],
    "distillation.losses": [
        "distillation_loss",
        "forward_kl_loss",
        "fused_linear_distillation_loss",
        "hidden_state_loss",
        "jsd_loss",
        "mse_logits_loss",
        "reverse_kl_loss",
    ],
    "distillation.student": ["create_student"],
    "distillation.cache": ["CachedTeacherLogits", "cache_teacher_logits"],
    "distillation.sparse_losses": ["sparse_distillation_loss", "sparse_forward_kl_and_cross_entropy"],
    "pruning.config": ["PruningConfig"],
    "pruning.unstructured": ["make_pruning_permanent_", "prune_"],
    "pruning.callback": ["PruningCallback"],
    "pruning.report": ["sparsity_report"],
    "pruning.lora": ["merge_lora_keep_sparsity"],
    "pruning.semi_structured": [
        "SparseInferenceConfig",
        "SparseInferencePlan",
        "accelerate_sparse_inference_",
        "plan_sparse_inference",
        "to_semi_structured_sparse_",
    ],
    "pruning.structured": ["StructuredPruningConfig", "structured_prune_"],
    "quantization.config": ["QATConfig"],
    "quantization.qat": ["convert_qat_", "prepare_qat_", "save_qat_model"],
    "quantization.callback": ["PostTrainingQuantizationCallback", "QATCallback"],
    "quantization.ptq": ["quantize_int4_for_decoding_", "quantize_model"],
    "quantization.packed": ["quantize_packed_"],
    "inference": ["CUDAGraphRunner", "StaticCacheDecoder", "capture_cuda_graphs_", "decode_tokens_per_second"],
    "qlora": ["find_lora_target_modules", "load_qlora_model", "merge_qlora", "prepare_qlora"],
    "metrics": ["classification_metrics", "compute_perplexity", "make_compute_metrics"],
    "reporting": ["CompressionReport", "CompressionReportCallback", "compression_report"],
    "recipes": ["Recipe", "load_recipe", "run_recipe"],
    "errors": ["RecipeError", "UnavailableError"],
    "utils.loading": [
        "find_packaged_gguf",
        "gguf_to_folder",
        "load_pretrained",
        "load_tokenizer",
        "smollm2_folder",
        "strip_gguf_quantization_",
    ],
    "utils.checkpoints": ["CorruptCheckpointError", "is_complete_checkpoint", "last_complete_checkpoint"],
    "utils.reliability": ["NonFiniteError"],
    "utils.shutdown": ["GracefulShutdownCallback"],
    "utils.validation": ["InvalidArgumentTypeError"],
    "utils.tasks": ["normalize_task"],
    "utils.threads": ["configure_threads"],
    "utils.imports": [
        "is_bitsandbytes_available",
        "is_peft_available",
        "is_torchao_available",
    ],
}

_NAME_TO_MODULE = {name: module for module, names in _IMPORT_STRUCTURE.items() for name in names}

__all__ = sorted(_NAME_TO_MODULE)


def __getattr__(name: str) -> Any:
    module_name = _NAME_TO_MODULE.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


class _RegisterPackedFormat:
    """Registers hf_compress' packed int4 format with transformers' quantizer registry right after
    `transformers.modeling_utils` is imported, so `import hf_compress` stays light and a stock `from_pretrained`
    loads packed exports (see utils/packed_int4.py)."""

    target = "transformers.modeling_utils"

    @staticmethod
    def register() -> None:
        try:
            importlib.import_module(".utils.packed_int4", __name__).register()
        except ImportError:  # pragma: no cover - transformers without quantizers
            pass

    def find_spec(self, name, path=None, target=None):
        if name != self.target:
            return None
        import sys

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_register(module):
                exec_module(module)
                self.register()

            spec.loader.exec_module = exec_and_register
        return spec


def _install_packed_format_hook() -> None:
    import sys

    if _RegisterPackedFormat.target in sys.modules:
        _RegisterPackedFormat.register()
    elif not any(isinstance(f, _RegisterPackedFormat) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterPackedFormat())


_install_packed_format_hook()


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .distillation.config import DistillationConfig  # noqa: F401
    from .distillation.trainer import DistillationTrainer  # noqa: F401
