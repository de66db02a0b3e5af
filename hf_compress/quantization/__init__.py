"""Quantization inside Trainer runs: quantization-aware training (torchao) and post-training quantization
(bitsandbytes, torchao)."""

from .callback import PostTrainingQuantizationCallback, QATCallback
from .config import QATConfig
from .ptq import PTQ_METHODS, quantize_int4_for_decoding_, quantize_model
from .qat import convert_qat_, prepare_qat_, save_qat_model

__all__ = [
    "PTQ_METHODS",
    "PostTrainingQuantizationCallback",
    "QATCallback",
    "QATConfig",
    "convert_qat_",
    "prepare_qat_",
    "quantize_int4_for_decoding_",
    "quantize_model",
    "save_qat_model",
]
