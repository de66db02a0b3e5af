"""LoftQ initialisation of the LoRA adapters of a 4-bit model from the full-precision weights (Li et al., 2023,
https://arxiv.org/abs/2310.08659)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------
# LoftQ
# --------------------------------------------------------------------------------------------------------------
class _SafetensorsWeights:
    """Reads single tensors lazily from a (possibly sharded) safetensors checkpoint folder."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_dir():
            try:
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(str(path), allow_patterns=["*.safetensors", "*.json"]))
            except Exception as err:
                raise ValueError(
                    f"LoftQ needs the full-precision safetensors of the base model; {str(path)!r} is neither a local "
                    f"folder nor a downloadable hub model ({err}). Pass loftq_model_path=<folder>."
                ) from err
        index = path / "model.safetensors.index.json"
        if index.exists():
            self.weight_map = {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (path / "model.safetensors").exists():
            self.weight_map = None
            self.file = path / "model.safetensors"
        else:
            raise ValueError(f"LoftQ needs model.safetensors (or a sharded index) in {str(path)!r}; none found.")

    def get(self, name: str, prefix: str | None) -> torch.Tensor:
        from safetensors import safe_open

        candidates = [name] + ([name[len(prefix) + 1 :]] if prefix and name.startswith(prefix + ".") else [])
        for key in candidates:
            file = self.file if self.weight_map is None else self.weight_map.get(key)
            if file is None:
                continue
            with safe_open(str(file), framework="pt", device="cpu") as f:
                if key in f.keys():
                    return f.get_tensor(key)
        raise KeyError(f"LoftQ: weight {name!r} not found in the full-precision checkpoint.")


@torch.no_grad()
def loftq_init_(peft_model, model_path: str | os.PathLike | None, adapter_name: str = "default") -> int:
    """LoftQ initialisation of the LoRA weights of a bitsandbytes 4-bit PEFT model, in place.

    For each adapted `Linear4bit` layer, the full-precision weight W is read lazily from `model_path`, the 4-bit
    weight Q is dequantized, and the adapters are set to the rank-r SVD of the quantization error W - Q, so that
    base + adapter starts closer to the full-precision model (Li et al., 2023, https://arxiv.org/abs/2310.08659).

    Hand-written rather than `peft.replace_lora_weights_loftq` for two reasons: PEFT 0.21 computes on
    `"cuda"`/`"xpu"` unconditionally (so it cannot run on CPU), and it ignores the LoRA scaling `alpha / r`
    (peft#1982), so with `lora_alpha != r` its initial adapter over- or under-shoots the error. Here the SVD factors
    are divided by `sqrt(scaling)`, so `scaling * B @ A` is the best rank-r approximation of W - Q. Only one step is
    taken: the base is already quantized, so the alternating refinement of the paper (re-quantizing W - BA) does not
    apply.

    Returns:
        `int`: the number of layers initialised.
    """
    import bitsandbytes.functional as bnb_f
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    if model_path is None:
        raise ValueError("LoftQ needs the path of the full-precision base model (loftq_model_path).")
    weights = _SafetensorsWeights(model_path)
    base = peft_model.get_base_model()
    prefix = getattr(base, "base_model_prefix", None)
    count = 0
    for name, module in base.named_modules():
        if not isinstance(module, LoraLinear4bit) or adapter_name not in module.lora_A:
            continue
        qweight = module.get_base_layer().weight
        dequantized = bnb_f.dequantize_4bit(qweight.data, qweight.quant_state).float()
        full = weights.get(name + ".weight", prefix).to(device=dequantized.device, dtype=torch.float32)
        if full.shape != dequantized.shape and full.t().shape == dequantized.shape:
            full = full.t()  # GPT-2 Conv1D checkpoints store the weight as (in, out)
        U, S, Vh = torch.linalg.svd(full - dequantized, full_matrices=False)
        rank = module.r[adapter_name]
        root = S[:rank].sqrt() / math.sqrt(module.scaling[adapter_name])
        lora_A = module.lora_A[adapter_name].weight
        lora_B = module.lora_B[adapter_name].weight
        lora_A.data = (root[:, None] * Vh[:rank]).to(lora_A.dtype)
        lora_B.data = (U[:, :rank] * root[None, :]).to(lora_B.dtype)
        count += 1
    if count == 0:
        raise ValueError("LoftQ found no 4-bit LoRA layer (peft Linear4bit) in the model.")
    logger.info(f"LoftQ: initialised {count} LoRA layers from {model_path}")
    return count


__all__ = ["loftq_init_"]
