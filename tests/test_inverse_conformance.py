"""Conformance suite: every inverse method against an explicit matrix A (see inverse_problems).

To add a method, append a ``Case`` to ``CASES``: a factory ``damping -> unfitted inverse``, the
problem on which the method is exact (or close), and the relative tolerance it must meet there.
Problems (``inverse_problems.PROBLEMS``): "dense" (Linear(4, 2) + L2, full non-diagonal A),
"diagonal" (diagonal A), "low_rank" (a single Linear(6, 1) with one output and 3 examples: rank 3
of p = 7, where a Kronecker factorisation is exact), "zero" (A = 0), "blocks" (block-diagonal A
over two modules). Lazy methods (no stored tensors) are re-attached to the curvature after loading
in the round-trip test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.errors import NotFittedError
from influencekit.storage import load_inverse, save_inverse

from .inverse_problems import PROBLEMS


@dataclass
class Case:
    id: str
    factory: Callable[[float], ik.InverseCurvature]
    problem: str
    rtol: float


CASES = [
    Case("exact", lambda lam: ik.Exact(damping=lam), "dense", 1e-10),
    # K-FAC family: exact on these problems (one output per layer; a Hadamard design)
    Case("kfac", lambda lam: ik.KFAC(damping=lam), "blocks", 1e-10),
    Case("ekfac", lambda lam: ik.EKFAC(damping=lam), "blocks", 1e-10),
    Case("kfac_diag", lambda lam: ik.KFAC(damping=lam), "diagonal", 1e-10),
    Case("ekfac_diag", lambda lam: ik.EKFAC(damping=lam, labels="sampled", n_samples=2),
         "diagonal", 1e-10),
    Case("cg", lambda lam: ik.CG(damping=lam, max_iter=50, tol=1e-12), "dense", 1e-10),
    Case("lissa", lambda lam: ik.LiSSA(damping=lam, scale=5.0, n_iter=150), "dense", 1e-10),
    Case("arnoldi_full", lambda lam: ik.Arnoldi(damping=lam, rank=10, n_iter=10), "dense",
         1e-9),
    Case("arnoldi_low_rank", lambda lam: ik.Arnoldi(damping=lam, rank=3, n_iter=7,
                                                    complement="damping"), "low_rank", 1e-9),
    Case("diagonal", lambda lam: ik.Diagonal(damping=lam), "diagonal", 1e-12),
    Case("diagonal_hutchinson", lambda lam: ik.Diagonal(damping=lam, estimator="hutchinson",
                                                         probes=4), "diagonal", 1e-12),
    Case("identity", lambda lam: ik.Identity(damping=lam), "zero", 1e-12),
    Case("block_exact", lambda lam: ik.block_diagonal(default=ik.Exact(damping=lam)), "blocks",
         1e-10),
    Case("block_mixed", lambda lam: ik.block_diagonal(
        {"head1": ik.Exact(damping=lam), "head2": ik.CG(damping=lam, tol=1e-13)}), "blocks",
         1e-10),
    Case("block_names", lambda lam: ik.block_diagonal(
        [(["head1.weight", "head1.bias"], ik.Arnoldi(damping=lam, rank=4, n_iter=4))],
        default=ik.Exact(damping=lam)), "blocks", 1e-9),
]
# diagonal_hutchinson: on the Hadamard problem the off-diagonal entries are 0, so every
# Rademacher probe gives z ⊙ (A z) = diag(A) exactly; the estimator is exact there.

DAMPING = 0.1


def _rows(p, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, p, dtype=torch.float64, generator=gen)


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request):
    return request.param


@pytest.fixture
def problem(case):
    return PROBLEMS[case.problem]()


def test_problem_matrix_is_the_curvature(problem):
    """The hand-written A is the library's dense curvature (validates the problem itself)."""
    np.testing.assert_allclose(problem.curvature.dense().numpy(), problem.matrix, atol=1e-12)


def test_fit_returns_self(case, problem):
    inverse = case.factory(DAMPING)
    assert inverse.fit(problem.curvature) is inverse
    assert inverse.is_fitted


def test_solve_before_fit_raises(case, problem):
    with pytest.raises(NotFittedError):
        case.factory(DAMPING).solve(_rows(problem.matrix.shape[0]))


def test_solve_inverts_damped_matrix(case, problem):
    inverse = case.factory(DAMPING).fit(problem.curvature)
    g = _rows(problem.matrix.shape[0])
    a = torch.as_tensor(problem.matrix) + DAMPING * torch.eye(problem.matrix.shape[0],
                                                              dtype=torch.float64)
    out = inverse.solve(g @ a.T)
    assert out.shape == g.shape and out.dtype == g.dtype
    torch.testing.assert_close(out, g, rtol=case.rtol, atol=case.rtol * float(g.abs().max()))


def test_batched_equals_one_at_a_time(case, problem):
    inverse = case.factory(DAMPING).fit(problem.curvature)
    g = _rows(problem.matrix.shape[0], k=4, seed=1)
    batched = inverse.solve(g)
    single = torch.stack([inverse.solve(row) for row in g])
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-12)


def test_state_round_trip(case, problem, tmp_path):
    inverse = case.factory(DAMPING).fit(problem.curvature)
    g = _rows(problem.matrix.shape[0], seed=2)
    before = inverse.solve(g)
    save_inverse(tmp_path / "inv", inverse)
    loaded = load_inverse(tmp_path / "inv", problem.target)
    assert loaded.get_config() == inverse.get_config()
    if hasattr(loaded, "attach"):  # lazy methods keep no tensors: re-attach the data
        try:
            loaded.solve(g)
        except NotFittedError:
            loaded.attach(problem.curvature)
        else:
            assert not any(getattr(b, "lazy", False) for b in getattr(loaded, "blocks_", []))
    torch.testing.assert_close(loaded.solve(g), before, rtol=1e-12, atol=1e-14)


def test_more_damping_smaller_norm(case, problem):
    g = _rows(problem.matrix.shape[0], seed=3)
    small = case.factory(DAMPING).fit(problem.curvature).solve(g)
    large = case.factory(10 * DAMPING).fit(problem.curvature).solve(g)
    assert bool((large.norm(dim=1) < small.norm(dim=1)).all())
