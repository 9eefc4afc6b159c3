"""Breast-cancer logistic regression: scikit-learn's bundled Wisconsin table (569 x 30).

``data(n_train)`` standardises the 30 features by the training mean and standard deviation and
splits the rows at random (fixed seed); the remaining rows are the queries (``test row #i``).
``model(train, l2_strength)`` is a two-class linear classifier (``Linear(30, 2)``, float64)
trained to the exact optimum of mean cross-entropy + (l2_strength/2)‖θ‖² by Newton's method
(``ik.minimize``): convex, deterministic, so leave-one-out retraining is an exact ground truth.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..cli.rundata import RunData
from ..response import minimize, write_params
from ..task import ClassificationTask, L2Regularizer, Target

FEATURES = 30


def data(n_train: int = 400, seed: int = 0) -> RunData:
    """Training rows ``(x [n_train, 30], y [n_train])``; the other rows are the queries."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x, y = bunch.data.astype(np.float64), bunch.target.astype(np.int64)
    if not 0 < n_train < len(x):
        raise ValueError(f"n_train must be between 1 and {len(x) - 1}, got {n_train}")
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:n_train], order[n_train:]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    x = (x - mean) / std

    def as_tensors(rows):
        return torch.tensor(x[rows]), torch.tensor(y[rows])

    return RunData(train=as_tensors(train), query=as_tensors(test),
                   train_ids=[f"train row #{i}" for i in range(len(train))],
                   query_ids=[f"test row #{i}" for i in range(len(test))],
                   display={"kind": "vector", "feature_names": list(bunch.feature_names)},
                   classes=[str(c) for c in bunch.target_names])


def model(train, l2_strength: float = 1e-2) -> nn.Module:
    """``Linear(30, 2)`` at the optimum of mean cross-entropy + (l2_strength/2)‖θ‖² (float64)."""
    torch.manual_seed(0)
    linear = nn.Linear(FEATURES, 2).double()
    with torch.no_grad():
        for p in linear.parameters():
            p.zero_()
    target = Target(linear, ClassificationTask(), regularizer=L2Regularizer(l2_strength))
    write_params(target, minimize(target, train, grad_tol=1e-12).params)
    return linear
