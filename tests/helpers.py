"""Small shared builders for tests (float64 models and data)."""

import numpy as np
import torch
from torch import nn

import influencekit as ik


def pearson(a, b) -> float:
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def mlp(d_in=4, hidden=5, d_out=3, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).double()


def classification_data(n=20, d_in=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def breast_cancer_logreg(n_train=120, n_query=30, strength=1e-2):
    """L2-regularised logistic regression on scikit-learn's breast cancer data, at its optimum."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train_idx, query_idx = order[:n_train], order[n_train:n_train + n_query]
    x = torch.tensor(x, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.long)
    model = nn.Linear(x.shape[1], 2).double()
    target = ik.Target(model, ik.ClassificationTask(),
                       regularizer=ik.L2Regularizer(strength))
    train = (x[train_idx], y[train_idx])
    query = (x[query_idx], y[query_idx])
    result = ik.minimize(target, train, grad_tol=1e-12)
    ik.write_params(target, result.params)
    return target, train, query
