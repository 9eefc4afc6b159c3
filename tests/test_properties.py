"""Property-based tests (hypothesis): solvers on random positive definite matrices, the
converters of ``influencekit.conventions`` against autograd through a closed-form weighted ridge
regression, and the data layer (batch size, container, Runtime dtype) through ``pairwise``.

Each property runs a handful of examples (``max_examples`` small, no deadline) so the default
suite stays quick; the fixed problems of test_inverse_conformance.py cover the same methods at
hand-picked points.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, Dataset

import influencekit as ik
from influencekit import conventions

from .inverse_problems import random_problem

FAST = settings(max_examples=8, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


# -- (a) solvers ----------------------------------------------------------------------------------
def _spectrum(a: np.ndarray) -> tuple[float, float]:
    values = np.linalg.eigvalsh(a)
    return float(values[0]), float(values[-1])


def _lissa(lam, a):
    """LiSSA needs ~ condition-number steps: its damping is raised to keep (A + λI) within a
    condition number of 4 (the test then solves with that λ)."""
    low, high = _spectrum(a)
    lam = max(lam, (high - 4 * low) / 3)
    scale = 1.05 * (high + lam)
    depth = math.ceil(14 * scale / (low + lam))  # error ~ exp(-14) of the series
    return ik.LiSSA(damping=lam, scale=scale, n_iter=depth), 1e-5


SOLVERS = {  # name -> (factory(damping, A) -> (unfitted inverse, rtol in float64), outputs k)
    "exact": (lambda lam, a: (ik.Exact(damping=lam), 1e-9), None),
    "cg": (lambda lam, a: (ik.CG(damping=lam, max_iter=4 * len(a), tol=1e-13), 1e-8), None),
    "lissa": (_lissa, None),
    "arnoldi_full_rank": (lambda lam, a: (ik.Arnoldi(damping=lam, rank=len(a),
                                                     n_iter=len(a)), 1e-8), None),
    "block_diagonal_exact": (lambda lam, a: (ik.block_diagonal(default=ik.Exact(damping=lam)),
                                             1e-9), None),
    # K-FAC is exact for one linear layer with one output and a squared error
    "kfac": (lambda lam, a: (ik.KFAC(damping=lam), 1e-9), 1),
    "ekfac": (lambda lam, a: (ik.EKFAC(damping=lam), 1e-9), 1),
}


PROBLEM = dict(seed=st.integers(0, 10_000), d=st.integers(1, 4), extra=st.integers(0, 10),
               k=st.integers(1, 2), strength=st.floats(0.2, 1.0), damping=st.floats(0.01, 1.0),
               dtype=st.sampled_from([torch.float64, torch.float32]))


@pytest.mark.parametrize("name", [name for name in SOLVERS if name != "lissa"])
@FAST
@given(**PROBLEM)
def test_solvers_invert_random_damped_matrices(name, seed, d, extra, k, strength, damping,
                                               dtype):
    _check_solver(name, seed, d, extra, k, strength, damping, dtype)


@settings(FAST, max_examples=4)
@given(**PROBLEM)
def test_lissa_inverts_random_damped_matrices(seed, d, extra, k, strength, damping, dtype):
    """LiSSA apart, with fewer examples: every example costs ~ 50 passes over the data."""
    _check_solver("lissa", seed, d, extra, k, strength, damping, dtype)


def _check_solver(name, seed, d, extra, k, strength, damping, dtype):
    factory, outputs = SOLVERS[name]
    k = outputs or k
    problem = random_problem(seed, n=d + 1 + extra, d=d, k=k, strength=strength)
    a = problem.matrix
    inverse, rtol = factory(damping, a)
    inverse.fit(problem.curvature)
    damping = inverse.damping_  # the λ used (LiSSA's factory may raise it)
    p = len(a)
    x = torch.randn(3, p, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    g = x @ torch.as_tensor(a + damping * np.eye(p)).T  # (A + λI) x = g, x known
    out = inverse.solve(g.to(dtype))
    assert out.dtype == dtype and out.shape == (3, p)
    # float32 inputs: the answer is as good as the rounding of g (condition number x eps)
    low, high = _spectrum(a)
    if dtype == torch.float32:
        rtol = max(rtol, 20 * (high + damping) / (low + damping) * 2**-24)
    error = (out.to(torch.float64) - x).norm(dim=1) / x.norm(dim=1)
    assert float(error.max()) <= rtol


# -- (b) converters -------------------------------------------------------------------------------
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False)  # s/n stays non-zero


@settings(max_examples=50, deadline=None, derandomize=True)
@given(s=finite, n=st.floats(1.0, 1e6), epsilon=st.floats(-1.0, 1.0))
def test_converters_signs_and_round_trips(s, n, epsilon):
    wd = conventions.weight_derivative(s, n)
    removal = conventions.removal_effect(s, n)
    assert wd == -removal and (s > 0) == (removal > 0)
    assert conventions.koh_liang_up_loss(s) == -s
    assert math.isclose(-wd * n, s, rel_tol=1e-12, abs_tol=1e-300)  # back to the score
    assert math.isclose(conventions.predicted_change(s, n, epsilon), epsilon * wd,
                        rel_tol=1e-12, abs_tol=1e-300)
    # removing an example is the weight change ε = −1
    assert math.isclose(conventions.predicted_change(s, n, -1.0), removal, rel_tol=1e-12,
                        abs_tol=1e-300)
    # scale: twice the data, half the effect of one example
    assert math.isclose(conventions.removal_effect(s, 2 * n), removal / 2, rel_tol=1e-12,
                        abs_tol=1e-300)


@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), n=st.floats(1.0, 100.0))
def test_converters_keep_shapes_and_types(shape, n):
    s = torch.randn(*shape, dtype=torch.float64)
    for convert in (lambda v: conventions.weight_derivative(v, n),
                    lambda v: conventions.removal_effect(v, n), conventions.koh_liang_up_loss,
                    lambda v: conventions.predicted_change(v, n, 0.5)):
        out = convert(s)
        assert isinstance(out, torch.Tensor) and out.shape == s.shape
        np.testing.assert_allclose(convert(s.numpy()), out.numpy(), rtol=1e-15)


def _weighted_ridge(x, y, w, strength):
    """θ(w) of Σ w_i (x̃_iᵀθ − y_i)² / Σ w + strength/2 ‖θ‖², differentiable in w."""
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    total = w.sum()
    lhs = 2 / total * design.T @ (w[:, None] * design) + strength * torch.eye(design.shape[1],
                                                                              dtype=x.dtype)
    return torch.linalg.solve(lhs, 2 / total * design.T @ (w * y))


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(4, 15), d=st.integers(1, 3),
       strength=st.floats(0.05, 1.0), weighted=st.booleans())
def test_weight_derivative_is_the_real_derivative(seed, n, d, strength, weighted):
    """∂f/∂w_m = weight_derivative(s, n = Σw) against autograd through the closed-form weighted
    ridge solution, with and without per-example weights (n is Σw, not the count)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=torch.float64, generator=gen)
    y = torch.randn(n, dtype=torch.float64, generator=gen)
    qx, qy = torch.randn(3, d, dtype=torch.float64, generator=gen), torch.randn(3, 1,
                                                                                dtype=torch.float64,
                                                                                generator=gen)
    w = (torch.rand(n, dtype=torch.float64, generator=gen) * 2 + 0.1) if weighted \
        else torch.ones(n, dtype=torch.float64)
    w.requires_grad_(True)
    theta = _weighted_ridge(x, y, w, strength)
    pred = qx @ theta[:d] + theta[d]
    real = torch.stack([torch.autograd.grad(((pred[i] - qy[i, 0]) ** 2), w, retain_graph=True)[0]
                        for i in range(3)])                           # [n_query, n_train]
    model = nn.Linear(d, 1).double()
    target = ik.Target(model, ik.RegressionTask(), regularizer=ik.L2Regularizer(strength))
    ik.write_params(target, theta.detach())
    train = (x, y[:, None])
    inverse = ik.Exact(damping=0.0).fit(ik.Curvature(target, train, kind="hessian",
                                                     weights=w.detach() if weighted else None))
    scores = ik.Influence(target, inverse).pairwise((qx, qy), train)
    predicted = conventions.weight_derivative(scores, float(w.detach().sum()))
    torch.testing.assert_close(predicted, real, rtol=1e-7, atol=1e-10)


# -- (c) the data layer ---------------------------------------------------------------------------
class _Pairs(Dataset):
    """A plain map-style data set (not a TensorDataset): examples are (x_i, y_i)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _container(kind, data, batch):
    if kind == "tuple":
        return data
    if kind == "dataset":
        return _Pairs(*data)
    return DataLoader(_Pairs(*data), batch_size=batch, shuffle=False)


@pytest.fixture(scope="module")
def scored():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(14, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (14,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-2))
    train, query = (x[:10], y[:10]), (x[10:], y[10:])
    inverse = ik.Exact(damping=1e-2).fit(ik.Curvature(target, train, kind="ggn"))
    scorer = ik.Influence(target, inverse)
    return scorer, train, query, scorer.pairwise(query, train)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(train_kind=st.sampled_from(["tuple", "dataset", "loader"]),
       query_kind=st.sampled_from(["tuple", "dataset", "loader"]),
       runtime_batch=st.integers(1, 12), loader_batch=st.integers(1, 12),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_pairwise_is_the_same_for_any_batching_container_and_dtype(
        scored, train_kind, query_kind, runtime_batch, loader_batch, dtype):
    scorer, train, query, reference = scored
    runtime = ik.Runtime(batch_size=runtime_batch, dtype=dtype)
    scores = scorer.pairwise(_container(query_kind, query, loader_batch),
                             _container(train_kind, train, loader_batch), runtime)
    assert scores.shape == (4, 10)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    error = float((scores.to(torch.float64) - reference).abs().max())
    assert error <= tolerance * float(reference.abs().max())
