"""A tiny GPT-2 trained from scratch on the King James Bible, character by character.

``data(n_train, n_query, length)`` draws verses at random (fixed seed) from the whole Bible
(Debian ``bible-kjv-text``; :func:`influencekit.data.kjv_verses`): ``n_train`` training verses and
``n_query`` other verses as queries, each cut to ``length`` characters, lower-cased, encoded by a
:class:`~influencekit.data.CharTokenizer` (38 tokens) and right-padded (``attention_mask`` 0 on
padding, which the loss, the curvature and token scores ignore).

``model(train, ...)`` builds a ``transformers`` GPT-2 from a config (no download; dropout off) and
trains every parameter from a seeded initialisation with Adam on the mean next-token loss,
through the library's training loop (:func:`influencekit.response.train`). The same arguments
give the same parameters, bit for bit, so ``influencekit fit`` and ``score`` rebuild the same
model.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..cli.rundata import RunData
from ..data import CharTokenizer, kjv_verses
from ..grads import DictDataset
from ..response import batch_schedule, train, write_params
from ..runtime import Runtime
from ..task import CausalLMTask, Target

log = logging.getLogger(__name__)


def verse_split(n_train: int, n_query: int, seed: int = 0):
    """``(train verses, query verses)``: disjoint, drawn at random from all 31,102 verses."""
    verses = kjv_verses()
    if n_train + n_query > len(verses):
        raise ValueError(f"n_train + n_query must be at most {len(verses)}")
    order = torch.randperm(len(verses), generator=torch.Generator().manual_seed(seed))
    picked = [verses[int(i)] for i in order[:n_train + n_query]]
    return picked[:n_train], picked[n_train:]


def encode_verses(verses, length: int, tokenizer: CharTokenizer | None = None):
    """``(DictDataset of input_ids/attention_mask [n, length], tokens per verse as strings)``;
    the token strings stop where the padding starts."""
    tokenizer = tokenizer or CharTokenizer()
    batch = tokenizer.batch([v.text for v in verses], length)
    tokens = [tokenizer.decode_tokens(ids[mask.bool()])
              for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    return DictDataset(batch), tokens


def data(n_train: int = 1000, n_query: int = 8, length: int = 64, seed: int = 0) -> RunData:
    """Training verses and query verses of the KJV as padded character sequences."""
    train_verses, query_verses = verse_split(n_train, n_query, seed)
    train_set, train_tokens = encode_verses(train_verses, length)
    query_set, query_tokens = encode_verses(query_verses, length)
    return RunData(train=train_set, query=query_set,
                   train_ids=[v.reference for v in train_verses],
                   query_ids=[v.reference for v in query_verses],
                   display={"kind": "text", "train_tokens": train_tokens,
                            "query_tokens": query_tokens})


def gpt(vocab_size: int, length: int, n_embd: int = 32, n_layer: int = 2, n_head: int = 2,
        seed: int = 0, attn: str | None = None) -> nn.Module:
    """An untrained GPT-2 language model (tied embeddings, Conv1D layers, no dropout);
    ``attn``: transformers' attention implementation (``"eager"``, ``"sdpa"``; None: its
    default). Every implementation computes the same function."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=length, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                        **({} if attn is None else {"attn_implementation": attn}))
    return GPT2LMHeadModel(config).eval()


def model(train, n_embd: int = 32, n_layer: int = 2, n_head: int = 2, steps: int = 1500,
          batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """The tiny GPT trained on ``train`` (the :func:`data` training set) for ``steps`` Adam
    steps of ``batch_size`` sequences (float32, seeded)."""
    length = int(train[0]["input_ids"].shape[0])
    net = gpt(CharTokenizer().vocab_size, length, n_embd, n_layer, n_head, seed)
    target = Target(net, CausalLMTask())
    schedule = batch_schedule(len(train), batch_size=batch_size, seed=seed, steps=steps)
    log.info("training a %d-layer GPT-2 (%d parameters) on %d verses for %d steps", n_layer,
             target.num_params, len(train), steps)
    result = train_lm(target, train, schedule, lr)
    write_params(target, result.params)
    return net


def train_lm(target: Target, data, schedule, lr: float):
    """Adam on the mean (over sequences) summed next-token loss, via the one training loop."""
    return train(target, data, schedule, optimizer="adam", lr=lr,
                 runtime=Runtime(progress=False), desc="training tiny GPT")
