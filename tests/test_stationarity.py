"""diagnostics.stationarity: a logistic regression trained by Adam for 100 steps is not at its
optimum and fails; the same model polished by ik.minimize passes. The reported Newton step is
the exact solve (C + λI)⁻¹ ∇L, and for this nearly quadratic objective it is also the real
distance to the polished optimum."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.diagnostics import stationarity


@pytest.fixture(scope="module")
def models():
    """(Adam-trained target, polished target, train): breast cancer, 120 examples, L2 1e-2."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    order = np.random.default_rng(0).permutation(len(x))[:120]
    train = (torch.tensor(x[order]), torch.tensor(y[order]))
    torch.manual_seed(0)
    model = nn.Linear(30, 2).double()
    adam = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    ones = torch.ones(120, dtype=torch.float64)
    for _ in range(100):
        opt.zero_grad()
        adam.objective(dict(model.named_parameters()), [(train, ones)]).backward()
        opt.step()
    polished = ik.Target(copy.deepcopy(model), adam.task, regularizer=adam.regularizer)
    ik.write_params(polished, ik.minimize(polished, train, grad_tol=1e-12).params)
    return adam, polished, train


def _exact_newton_step(target, train, damping):
    """(C + λI)⁻¹ ∇L with C the dense GGN and ∇L by autograd on the whole objective."""
    theta = target.flat_params(torch.float64).requires_grad_(True)
    ones = torch.ones(len(train[1]), dtype=torch.float64)
    value = target.objective(target.space.unflatten(theta), [(train, ones)])
    (grad,) = torch.autograd.grad(value, theta)
    c = ik.Curvature(target, train, kind="ggn").dense()
    return torch.linalg.solve(c + damping * torch.eye(len(grad), dtype=torch.float64), grad)


def test_the_polished_optimum_passes(models):
    _, polished, train = models
    result = stationarity(polished, train)
    assert result.verdict == "pass" and result.finding().verdict == "pass"
    assert result.gradient_norm < 1e-10 and result.relative_step < 1e-9
    assert "is a minimiser" in result.message


def test_the_adam_model_fails_with_the_exact_newton_step(models):
    adam, polished, train = models
    result = stationarity(adam, train)
    assert result.verdict == "fail" and result.relative_step > 1e-2
    exact = _exact_newton_step(adam, train, result.damping)
    assert result.newton_step == pytest.approx(float(exact.norm()), rel=1e-7)
    assert result.parameter_norm == pytest.approx(float(adam.flat_params().norm()), rel=1e-12)
    assert result.relative_step == pytest.approx(result.newton_step / result.parameter_norm)
    # the Newton step is the real way back: the distance to the polished optimum
    distance = float((adam.flat_params() - polished.flat_params()).norm())
    assert result.newton_step == pytest.approx(distance, rel=0.01)
    assert "not a minimiser" in result.message and "ik.minimize" in result.message
    with pytest.warns(UserWarning, match="not a minimiser"):
        result.warn()


def test_with_a_fitted_inverse_the_step_is_in_its_metric(models):
    adam, _, train = models
    inverse = ik.Exact(damping=0.1).fit(ik.Curvature(adam, train, kind="ggn"))
    result = stationarity(adam, train, inverse=inverse)
    assert result.damping == 0.1 and result.kind == "ggn"
    exact = _exact_newton_step(adam, train, 0.1)
    assert result.newton_step == pytest.approx(float(exact.norm()), rel=1e-9)
    assert result.solver_residual < 1e-9


def test_top_eigenvalue_and_lower_bound(models):
    adam, _, train = models
    result = stationarity(adam, train)
    top = float(torch.linalg.eigvalsh(ik.Curvature(adam, train, kind="ggn").dense())[-1])
    assert result.top_eigenvalue == pytest.approx(top, rel=1e-6)
    assert result.gradient_over_curvature <= result.newton_step
