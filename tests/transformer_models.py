"""Tiny Hugging Face models built from configs (no download) and padded batches of uneven
length, for the tests of the model boundary (float64)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(make test installs it)")

F64 = torch.float64
VOCAB = 11
PAD = 0


def tiny_bert(num_labels: int = 3, seed: int = 0, attn: str = "sdpa"):
    """2-layer BERT sequence classifier, hidden 8, float64, eval mode."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=16, num_labels=num_labels,
        pad_token_id=PAD, attn_implementation=attn)
    return transformers.BertForSequenceClassification(config).to(F64).eval()


def tiny_gpt2(seed: int = 0, attn: str = "sdpa"):
    """2-layer GPT-2 language model (Conv1D layers, tied embeddings), float64, eval mode."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=8, n_layer=2, n_head=2, n_positions=16, bos_token_id=1,
        eos_token_id=2, pad_token_id=PAD, attn_implementation=attn)
    return transformers.GPT2LMHeadModel(config).to(F64).eval()


def padded(sequences: list[list[int]], length: int | None = None) -> dict:
    """``{"input_ids": [n, T], "attention_mask": [n, T]}``, right-padded to ``length``."""
    length = length or max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def random_sequences(n: int, seed: int, low: int = 2, high: int = 7) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=gen)
    return [torch.randint(1, VOCAB, (int(t),), generator=gen).tolist() for t in lengths]


def classification_data(n: int, seed: int, length: int | None = None) -> dict:
    """Padded sequences with labels ``[n]`` (3 classes)."""
    batch = padded(random_sequences(n, seed), length)
    gen = torch.Generator().manual_seed(seed + 1)
    batch["labels"] = torch.randint(0, 3, (n,), generator=gen)
    return batch


def lm_data(n: int, seed: int, length: int | None = None) -> dict:
    """Padded sequences for next-token prediction (targets derived from the mask)."""
    return padded(random_sequences(n, seed), length)
