"""README.md's Python blocks run as written, in order, in one session, on tiny models.

How: every ```python block of README.md is executed in order in one namespace, in a temporary folder that holds a
tiny `hf_compress_demo/1_teacher` (what `hf-compress demo` writes, shrunk) and a tiny causal LM, after the
replacements in `TINY` below (model names, data sizes, step counts, lengths). A block preceded by the line
`<!-- readme-test: gpu -->` runs only where CUDA is available. Every replacement must match the README: when a block
changes, this table changes with it, so the README cannot drift from the code unnoticed. (About a minute on 2 CPU
cores: the README chains seven Trainer runs, a teacher cache, quantization, QAT export, QLoRA, GGUF and a report.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_url_teacher

README = Path(__file__).resolve().parent.parent / "README.md"
GPU_MARKER = "<!-- readme-test: gpu -->"

# README text -> what the test runs instead (each must occur in the README)
TINY = {
    "load_phishing_dataset()": "load_phishing_dataset(max_examples=96)",
    "max_length=48": "max_length=32",  # the tiny teacher has 32 positions
    "num_train_epochs=2": "max_steps=2",
    "num_train_epochs=1": "max_steps=3",
    "end_step=200, frequency=20": "end_step=2, frequency=1",
    "start_step=50": "start_step=1",
    '"HuggingFaceTB/SmolLM2-135M"': "TINY_LM",
    'load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="train[:2000]")': "tiny_text()",
    "max_length=128": "max_length=32",
    "max_steps=100": "max_steps=2",
    "smollm2_folder()": "TINY_LM",
    "find_packaged_gguf()": "TINY_GGUF",
}


def readme_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, needs a GPU) of every ```python block."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        blocks.append((line, match.group(1), before.strip() == GPU_MARKER))
    return blocks


def _tiny_lm(folder: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_compress.data import load_phishing_dataset, train_url_tokenizer

    tokenizer = train_url_tokenizer(load_phishing_dataset(max_examples=200)["train"]["text"], vocab_size=128)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _tiny_text():
    from datasets import Dataset

    rows = [f"line {i}: the quick brown fox jumps over the lazy dog near the river bank at dawn" for i in range(32)]
    return Dataset.from_dict({"text": rows})


def test_every_replacement_matches_the_readme():
    text = README.read_text(encoding="utf-8")
    code = "\n".join(block for _, block, _ in readme_blocks(text))
    missing = [old for old in TINY if old not in code]
    assert not missing, f"README.md changed: update TINY in {__file__} for {missing}"


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("torchao")
    monkeypatch.chdir(tmp_path)
    save_tiny_url_teacher(tmp_path / "hf_compress_demo" / "1_teacher", layers=2, hidden=64, heads=4)
    pytest.importorskip("gguf")
    from tiny_gguf import tiny_llama_for_gguf, write_llama_gguf

    namespace = {
        "__name__": "__readme__",
        "TINY_LM": _tiny_lm(tmp_path / "tiny_lm"),
        "TINY_GGUF": str(write_llama_gguf(tiny_llama_for_gguf(), tmp_path / "tiny.gguf")),
        "tiny_text": _tiny_text,
    }
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 9 and sum(gpu for _, _, gpu in blocks) == 2
    ran = 0
    for line, code, gpu in blocks:
        if gpu and not torch.cuda.is_available():
            continue
        for old, new in TINY.items():
            code = code.replace(old, new)
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"README.md block at line {line} failed: {type(err).__name__}: {err}") from err
        ran += 1
    assert ran >= 9

    # what the chain left behind: every folder the README names, loadable, and the final report
    folders = ("student", "student-offline", "pruned", "smaller", "student-nf4", "student-qat/quantized", "small")
    for folder in (*folders, "student-ft/ptq_nf4"):
        assert (tmp_path / folder / "config.json").is_file(), folder
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "adapter" / "adapter_config.json").is_file()
    report = namespace["report"]
    assert [r.name for r in report.rows] == ["teacher", "student", "pruned", "smaller", "4-bit", "int4 (QAT)"]
    assert all("accuracy" in r.metrics for r in report.rows)
    assert report["pruned"].nonzero_parameters < report["student"].nonzero_parameters
    assert report["4-bit"].disk_bytes < report["student"].disk_bytes
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.png").is_file()
