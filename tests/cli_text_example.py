"""A tiny text data set and bag-of-words logistic regression for the CLI and report tests."""

import torch
from torch import nn

import influencekit as ik
from influencekit.cli import RunData

GOOD = ["great", "lovely", "fine", "happy", "superb"]
BAD = ["awful", "poor", "sad", "broken", "dull"]
FILLER = ["the", "movie", "was", "a", "plot", "very"]


def _sentences(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = GOOD if label == 1 else BAD
        picks = [words[int(j)] for j in torch.randint(len(words), (2,), generator=gen)]
        filler = [FILLER[int(j)] for j in torch.randint(len(FILLER), (3,), generator=gen)]
        texts.append(filler[:2] + picks[:1] + filler[2:] + picks[1:])
        labels.append(label)
    return texts, labels


VOCAB = sorted(set(GOOD + BAD + FILLER))


def _counts(texts):
    x = torch.zeros(len(texts), len(VOCAB), dtype=torch.float64)
    for row, words in enumerate(texts):
        for word in words:
            x[row, VOCAB.index(word)] += 1
    return x


def data(n_train: int = 24, n_query: int = 4) -> RunData:
    train_texts, train_labels = _sentences(n_train, seed=0)
    query_texts, query_labels = _sentences(n_query, seed=1)
    return RunData(train=(_counts(train_texts), torch.tensor(train_labels)),
                   query=(_counts(query_texts), torch.tensor(query_labels)),
                   train_ids=[f"review #{i}" for i in range(n_train)],
                   query_ids=[f"new review #{i}" for i in range(n_query)],
                   display={"kind": "text", "train_tokens": train_texts,
                            "query_tokens": query_texts},
                   classes=["negative", "positive"])


def model(train, l2: float = 0.1) -> nn.Module:
    linear = nn.Linear(len(VOCAB), 2).double()
    with torch.no_grad():
        for p in linear.parameters():
            p.zero_()
    target = ik.Target(linear, ik.ClassificationTask(), regularizer=ik.L2Regularizer(l2))
    ik.write_params(target, ik.minimize(target, train, grad_tol=1e-12).params)
    return linear
