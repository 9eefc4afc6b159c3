"""diagnostics.stationarity: a logistic regression trained by Adam for 100 steps is not at its
optimum and fails; the same model polished by ik.minimize passes. The reported Newton step is
the exact solve (C + λI)⁻¹ ∇L, and for this nearly quadratic objective it is also the real
distance to the polished optimum."""

from __future__ import annotations

import copy
import warnings

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


# -- at fit time ----------------------------------------------------------------------------------
def test_fit_warns_for_the_adam_model_with_its_distance(models):
    """inverse.fit measures the Newton step in its own metric, equal to the exact solve, stores
    it in fit_info_ and warns once with the distance and what to do."""
    adam, _, train = models
    with pytest.warns(UserWarning, match="not a minimiser") as caught:
        inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(adam, train, kind="ggn"))
    assert len([w for w in caught if "minimiser" in str(w.message)]) == 1
    info = inverse.fit_info_["stationarity"]
    exact = _exact_newton_step(adam, train, 1e-3)
    assert info["newton_step"] == pytest.approx(float(exact.norm()), rel=1e-9)
    assert info["relative_step"] == pytest.approx(
        float(exact.norm()) / float(adam.flat_params().norm()), rel=1e-9)
    assert info["verdict"] == "fail" and info["relative_step"] > 0.05
    assert info["top_eigenvalue"] is None
    message = str(caught[0].message)
    assert f"{info['newton_step']:.3g}" in message and "% of ||theta||" in message
    assert "ik.minimize" in message and "stationarity=False" in message
    assert caught[0].filename == __file__  # points at the user's call


def test_fit_of_the_polished_model_does_not_warn(models):
    _, polished, train = models
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inverse = ik.EKFAC(damping=1e-3).fit(ik.Curvature(polished, train, kind="ggn"))
        lazy = ik.CG(damping=1e-3).fit(ik.Curvature(polished, train, kind="ggn"))
    assert inverse.fit_info_["stationarity"]["verdict"] == "pass"
    assert inverse.fit_info_["stationarity"]["relative_step"] < 1e-9
    # CG is not asked to solve at fit: the bound ||grad L|| / damping decides
    assert lazy.fit_info_["stationarity"]["verdict"] == "pass"
    assert lazy.fit_info_["stationarity"]["newton_step"] is None


def test_fit_stationarity_opt_out_and_lazy_bound(models):
    adam, _, train = models
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = ik.Exact(damping=0.1).fit(ik.Curvature(adam, train), stationarity=False)
        lazy = ik.CG(damping=0.1).fit(ik.Curvature(adam, train))  # not measured: no warning
    assert "stationarity" not in quiet.fit_info_
    info = lazy.fit_info_["stationarity"]
    grad = stationarity(adam, train).gradient_norm
    assert info["verdict"] == "not measured"
    assert info["gradient_norm"] == pytest.approx(grad, rel=1e-9)
    assert info["relative_step"] == pytest.approx(
        grad / 0.1 / float(adam.flat_params().norm()), rel=1e-9)
    assert "ik.diagnostics.stationarity" in info["message"]


def test_fit_stationarity_uses_the_curvature_weights(models):
    """With weights, ∇L is the weighted mean: zero weight on half the data gives the gradient of
    the other half's objective (compared with an unweighted fit on that half)."""
    adam, _, train = models
    x, y = train
    w = torch.zeros(120, dtype=torch.float64)
    w[::2] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weighted = ik.Exact(damping=0.1).fit(ik.Curvature(adam, train, weights=w))
        half = ik.Exact(damping=0.1).fit(ik.Curvature(adam, (x[::2], y[::2])))
    a, b = weighted.fit_info_["stationarity"], half.fit_info_["stationarity"]
    assert a["gradient_norm"] == pytest.approx(b["gradient_norm"], rel=1e-10)
    assert a["newton_step"] == pytest.approx(b["newton_step"], rel=1e-8)
