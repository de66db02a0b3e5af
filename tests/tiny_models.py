"""Tiny models and data built from configs inside the tests: no hub, seconds each."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

VOCAB = 96


def tiny_bert(num_labels: int = 2, layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
        num_labels=num_labels,
        **kw,
    )
    return BertForSequenceClassification(cfg)


def tiny_distilbert(num_labels: int = 2, layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = DistilBertConfig(
        vocab_size=VOCAB,
        dim=hidden,
        n_layers=layers,
        n_heads=heads,
        hidden_dim=hidden * 2,
        max_position_embeddings=64,
        num_labels=num_labels,
        **kw,
    )
    return DistilBertForSequenceClassification(cfg)


def tiny_roberta(num_labels: int = 2, layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=70,
        num_labels=num_labels,
        **kw,
    )
    return RobertaForSequenceClassification(cfg)


def tiny_gpt2(layers: int = 2, hidden: int = 32, heads: int = 4, vocab: int = VOCAB, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64, **kw)
    return GPT2LMHeadModel(cfg)


def tiny_llama(
    layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2, vocab: int = VOCAB, seed: int = 0, **kw
):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
        **kw,
    )
    return LlamaForCausalLM(cfg)


def random_token_batch(batch: int = 4, seq: int = 12, vocab: int = VOCAB, seed: int = 0, pad_last: int = 0):
    """input_ids / attention_mask, with the last `pad_last` positions of odd rows padded out."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        mask[1::2, -pad_last:] = 0
        ids[1::2, -pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask}


class ListDataset(torch.utils.data.Dataset):
    """A list of feature dicts, usable as a Trainer dataset."""

    def __init__(self, rows):
        self.rows = list(rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def classification_dataset(n: int = 64, seq: int = 10, vocab: int = VOCAB, num_labels: int = 2, seed: int = 0):
    """Token sequences whose label is decided by whether token 7 occurs: learnable by a tiny model."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(10, vocab, (seq,), generator=g)
        label = i % num_labels
        if label == 1:
            ids[int(torch.randint(0, seq, (1,), generator=g))] = 7
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": label})
    return ListDataset(rows)


def lm_dataset(n: int = 32, seq: int = 16, vocab: int = VOCAB, seed: int = 0):
    """Causal-LM rows following a simple rule (next token = current + 1 mod vocab) so loss can fall quickly."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, vocab, (1,), generator=g))
        ids = (torch.arange(seq) + start) % vocab
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": ids.clone()})
    return ListDataset(rows)


def tiny_qwen2(
    layers: int = 4, hidden: int = 32, heads: int = 4, kv_heads: int = 2, vocab: int = VOCAB, seed: int = 0, **kw
):
    """Qwen2: a Llama-family layout whose config has no `head_dim` field (head_dim = hidden / heads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
        **kw,
    )
    return Qwen2ForCausalLM(cfg)


def save_tiny_url_teacher(folder, layers: int = 2, hidden: int = 32, heads: int = 4, num_urls: int = 400, seed: int = 0):
    """A tiny BERT URL classifier + WordPiece tokenizer trained on the embedded phishing URLs, saved to `folder`."""
    from transformers import BertConfig, BertForSequenceClassification

    from hf_compress.data import load_phishing_dataset, train_url_tokenizer

    data = load_phishing_dataset(max_examples=num_urls, seed=seed)
    tokenizer = train_url_tokenizer(data["train"]["text"], vocab_size=128, model_max_length=32)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 2, max_position_embeddings=32, num_labels=2, pad_token_id=tokenizer.pad_token_id,
    )
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer
