"""QLoRA helpers: a 4-bit (NF4, double quantization) base with LoRA adapters, ready for any Trainer, and a merge
that keeps the accuracy the adapter reached on the quantized base.

The heavy lifting is done by bitsandbytes (quantization kernels), transformers (`BitsAndBytesConfig`, loading,
`dequantize()`) and PEFT (`prepare_model_for_kbit_training`, `LoraConfig`, `merge_and_unload`). This module picks
the defaults of the QLoRA paper (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314), discovers the LoRA
targets from the architecture and merges the adapter into the *dequantized* base, the weights it was trained
against (merging into the original full-precision weights or into the 4-bit weights both change the function the
adapter learnt: peft#2321, peft#1043, transformers#31293).

PEFT's layout: one file per concern.

- `loading.py`: [`load_qlora_model`] and [`prepare_qlora`] (bitsandbytes config, k-bit preparation, checkpointing)
- `targets.py`: [`find_lora_target_modules`]
- `loftq.py`: [`loftq_init_`] (LoftQ initialisation of the adapters)
- `merge.py`: [`merge_qlora`] and [`QLoRAMergeResult`]
"""

from .loading import load_qlora_model, prepare_qlora
from .loftq import loftq_init_
from .merge import QLoRAMergeResult, merge_qlora
from .targets import find_lora_target_modules

__all__ = [
    "QLoRAMergeResult",
    "find_lora_target_modules",
    "load_qlora_model",
    "loftq_init_",
    "merge_qlora",
    "prepare_qlora",
]
