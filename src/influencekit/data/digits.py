"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): the embedded default data set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Split:
    """``x_train [n, 64]`` in [0, 1], ``y_train [n]``, ``x_test``, ``y_test``; images are 8x8."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    image_shape: tuple[int, int] = (8, 8)


def load_digits_split(n_train: int = 1200, seed: int = 0, dtype=torch.float64) -> Split:
    """A fixed random split of the digits; pixels scaled from 0..16 to 0..1."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    if not 0 < n_train < len(x):
        raise ValueError(f"n_train must be between 1 and {len(x) - 1}, got {n_train}")
    train, test = order[:n_train], order[n_train:]
    x = torch.tensor(x / 16.0, dtype=dtype)
    y = torch.tensor(y, dtype=torch.long)
    return Split(x[train], y[train], x[test], y[test])
