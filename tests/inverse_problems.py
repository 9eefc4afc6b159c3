"""Explicit-matrix problems for the inverse conformance suite.

Each problem is a least-squares Target whose curvature (Hessian = GGN of the mean squared error,
plus an L2 term) is a matrix A written down here in numpy from the design matrix alone,
independently of influencekit's curvature code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import influencekit as ik


@dataclass
class Problem:
    name: str
    curvature: ik.Curvature
    matrix: np.ndarray  # A [p, p], the curvature C in the flat parameter order

    @property
    def target(self):
        return self.curvature.target


def _design(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)


def _linear(d_in, d_out, x, strength=0.0, params=None, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(d_in, d_out).to(torch.float64)
    reg = ik.L2Regularizer(strength) if strength else None
    target = ik.Target(model, ik.RegressionTask(), params=params, regularizer=reg)
    y = torch.randn(x.shape[0], d_out, dtype=torch.float64)
    return target, (torch.as_tensor(x), y)


def _least_squares_matrix(x: np.ndarray, k: int, strength: float) -> np.ndarray:
    """A of Linear(d, k) + L2 ``strength`` on inputs ``x [n, d]``: blockdiag over the k outputs
    of (2/n) X̃ᵀX̃, + strength I, in the flat order weight [k, d] row-major, then bias [k]."""
    n, d = x.shape
    gram = 2.0 / n * _design(x).T @ _design(x)          # [(w_0..w_{d-1}, b)]
    p = k * (d + 1)
    a = np.zeros((p, p))
    for j in range(k):
        idx = [j * d + i for i in range(d)] + [k * d + j]
        a[np.ix_(idx, idx)] = gram
    return a + strength * np.eye(p)


def dense_problem() -> Problem:
    """Linear(4, 2), 12 examples, L2 0.3: A = blockdiag over outputs of (2/n) X̃ᵀX̃, + 0.3 I."""
    rng = np.random.default_rng(1)
    n, d, k, strength = 12, 4, 2, 0.3
    x = rng.normal(size=(n, d))
    target, data = _linear(d, k, x, strength)
    return Problem("dense", ik.Curvature(target, data, kind="hessian"),
                   _least_squares_matrix(x, k, strength))


def random_problem(seed: int, n: int, d: int, k: int, strength: float,
                   kind: str = "ggn") -> Problem:
    """A random positive definite A: Linear(d, k) on ``n`` Gaussian inputs with L2 ``strength``
    (property tests draw ``seed, n, d, k, strength``). With k = 1 the K-FAC family is exact."""
    x = np.random.default_rng(seed).normal(size=(n, d))
    target, data = _linear(d, k, x, strength, seed=seed)
    return Problem(f"random(seed={seed}, n={n}, d={d}, k={k}, strength={strength:.3g})",
                   ik.Curvature(target, data, kind=kind), _least_squares_matrix(x, k, strength))


def diagonal_problem() -> Problem:
    """Linear(3, 1) on Hadamard columns (orthogonal, zero mean): A = diag(2, 8, 18, 2)."""
    h = np.array([[1.0]])
    for _ in range(3):
        h = np.block([[h, h], [h, -h]])                  # 8 x 8 Hadamard
    x = h[:, 1:4] * np.array([1.0, 2.0, 3.0])
    target, data = _linear(3, 1, x)
    a = 2.0 / 8 * _design(x).T @ _design(x)
    return Problem("diagonal", ik.Curvature(target, data, kind="ggn"), a)


def low_rank_problem() -> Problem:
    """Linear(6, 1) with 3 examples and no regulariser: A = (2/3) X̃ᵀX̃ has rank 3 of p = 7."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 6))
    target, data = _linear(6, 1, x)
    return Problem("low_rank", ik.Curvature(target, data, kind="hessian"),
                   2.0 / 3 * _design(x).T @ _design(x))


def zero_problem() -> Problem:
    """Only the weight of Linear(3, 1) on all-zero inputs: A = 0 [3, 3]."""
    x = np.zeros((5, 3))
    target, data = _linear(3, 1, x, params=["weight"])
    return Problem("zero", ik.Curvature(target, data, kind="hessian"), np.zeros((3, 3)))


class TwoHeads(nn.Module):
    """Two independent linear heads on disjoint input columns; outputs concatenated."""

    def __init__(self):
        super().__init__()
        self.head1 = nn.Linear(3, 1)
        self.head2 = nn.Linear(2, 1)

    def forward(self, x):
        return torch.cat([self.head1(x[:, :3]), self.head2(x[:, 3:])], dim=1)


def blocks_problem() -> Problem:
    """TwoHeads with L2 0.1: the squared error separates over outputs, so A is block diagonal."""
    rng = np.random.default_rng(3)
    n, strength = 10, 0.1
    x = rng.normal(size=(n, 5))
    torch.manual_seed(0)
    model = TwoHeads().to(torch.float64)
    target = ik.Target(model, ik.RegressionTask(), regularizer=ik.L2Regularizer(strength))
    data = (torch.as_tensor(x), torch.randn(n, 2, dtype=torch.float64))
    a1 = 2.0 / n * _design(x[:, :3]).T @ _design(x[:, :3])
    a2 = 2.0 / n * _design(x[:, 3:]).T @ _design(x[:, 3:])
    a = np.zeros((7, 7))
    a[:4, :4], a[4:, 4:] = a1, a2
    a += strength * np.eye(7)
    return Problem("blocks", ik.Curvature(target, data, kind="ggn"), a)


PROBLEMS = {"dense": dense_problem, "diagonal": diagonal_problem, "low_rank": low_rank_problem,
            "zero": zero_problem, "blocks": blocks_problem}
