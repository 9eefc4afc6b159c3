"""The digits MLP shared by the issue-5 benchmarks (scikit-learn digits, float64, CPU)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import influencekit as ik


def digits_splits(seed: int = 0):
    """(train, heldout, pool) as (x [n, 64] float64 in [0, 1], y [n] long): 700 / 400 / 697."""
    data = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.target))
    x = torch.tensor(data.data[order] / 16.0, dtype=torch.float64)
    y = torch.tensor(data.target[order], dtype=torch.long)
    return (x[:700], y[:700]), (x[700:1100], y[700:1100]), (x[1100:], y[1100:])


def mlp(hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(
        torch.float64)


def train_mlp(train, *, hidden=32, epochs=60, lr=0.01, batch_size=64, l2=1e-3, seed=0,
              checkpoints_every=None):
    """Adam on mini-batches through the library's training loop (a seeded permutation per
    epoch); returns (target, list of flat checkpoints every ``checkpoints_every`` epochs)."""
    torch.manual_seed(seed)
    model = mlp(hidden)
    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(l2))
    n = len(train[1])
    per_epoch = -(-n // batch_size)
    record = ([per_epoch * e for e in range(checkpoints_every, epochs + 1, checkpoints_every)]
              if checkpoints_every else [])
    schedule = ik.response.batch_schedule(n, batch_size=batch_size, seed=seed, epochs=epochs)
    run = ik.response.train(target, train, schedule, optimizer="adam", lr=lr, record_at=record,
                            runtime=ik.Runtime(progress=False))
    ik.write_params(target, run.params)
    return target, [run.recorded[step] for step in record]


def accuracy(model, data) -> float:
    with torch.no_grad():
        return float((model(data[0]).argmax(1) == data[1]).double().mean())
