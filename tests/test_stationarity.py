"""diagnostics.stationarity: a model at its exact optimum passes; the same model a few Adam
steps away fails, and the reported Newton step is the exact solve (C + λI)⁻¹ ∇L, which for this
nearly quadratic objective is also the real distance back to the optimum."""

from __future__ import annotations

import copy

import pytest
import torch

import influencekit as ik
from influencekit.diagnostics import stationarity

from .helpers import breast_cancer_logreg


@pytest.fixture(scope="module")
def optimum():
    return breast_cancer_logreg(n_train=120)


def _moved_by_adam(target, train, steps=3, lr=0.01):
    """A copy of the model after a few full-batch Adam steps on the training objective."""
    model = copy.deepcopy(target.model)
    moved = ik.Target(model, target.task, regularizer=target.regularizer)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ones = torch.ones(len(train[1]), dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        moved.objective(dict(model.named_parameters()), [(train, ones)]).backward()
        opt.step()
    return moved


def _exact_newton_step(target, train, damping):
    """(C + λI)⁻¹ ∇L with C the dense GGN and ∇L by autograd on the whole objective."""
    theta = target.flat_params(torch.float64).requires_grad_(True)
    ones = torch.ones(len(train[1]), dtype=torch.float64)
    value = target.objective(target.space.unflatten(theta), [(train, ones)])
    (grad,) = torch.autograd.grad(value, theta)
    c = ik.Curvature(target, train, kind="ggn").dense()
    return torch.linalg.solve(c + damping * torch.eye(len(grad), dtype=torch.float64), grad)


def test_the_optimum_passes(optimum):
    target, train, _ = optimum
    result = stationarity(target, train)
    assert result.verdict == "pass" and result.finding().verdict == "pass"
    assert result.gradient_norm < 1e-10 and result.relative_step < 1e-9
    assert "is a minimiser" in result.message


def test_a_few_adam_steps_away_fails_with_the_exact_newton_step(optimum):
    target, train, _ = optimum
    moved = _moved_by_adam(target, train)
    result = stationarity(moved, train)
    assert result.verdict == "fail"
    exact = _exact_newton_step(moved, train, result.damping)
    assert result.newton_step == pytest.approx(float(exact.norm()), rel=1e-7)
    assert result.parameter_norm == pytest.approx(float(moved.flat_params().norm()), rel=1e-12)
    assert result.relative_step == pytest.approx(result.newton_step / result.parameter_norm)
    # Newton's step is (nearly) the real way back: the distance to the polished optimum
    distance = float((moved.flat_params() - target.flat_params()).norm())
    assert result.newton_step == pytest.approx(distance, rel=0.05)
    assert "not a minimiser" in result.message and "ik.minimize" in result.message
    with pytest.warns(UserWarning, match="not a minimiser"):
        result.warn()


def test_with_a_fitted_inverse_the_step_is_in_its_metric(optimum):
    target, train, _ = optimum
    moved = _moved_by_adam(target, train)
    inverse = ik.Exact(damping=0.1).fit(ik.Curvature(moved, train, kind="ggn"))
    result = stationarity(moved, train, inverse=inverse)
    assert result.damping == 0.1 and result.kind == "ggn"
    exact = _exact_newton_step(moved, train, 0.1)
    assert result.newton_step == pytest.approx(float(exact.norm()), rel=1e-9)
    assert result.solver_residual < 1e-9


def test_top_eigenvalue_and_lower_bound(optimum):
    target, train, _ = optimum
    moved = _moved_by_adam(target, train)
    result = stationarity(moved, train)
    top = float(torch.linalg.eigvalsh(ik.Curvature(moved, train, kind="ggn").dense())[-1])
    assert result.top_eigenvalue == pytest.approx(top, rel=1e-6)
    assert result.gradient_over_curvature <= result.newton_step
