"""Dense curvature of every kind against independent computations; dense vs matrix-free."""

import pytest
import torch

import influencekit as ik
from influencekit.grads import gradients

from .helpers import classification_data, mlp


def _flat_objective(target, data, weights=None):
    x, y = data
    w = torch.ones(len(x), dtype=torch.float64) if weights is None else weights

    def f(flat):
        params = target.space.unflatten(flat)
        return (w * target.losses(params, (x, y))).sum() / w.sum() + target.regularization(params)
    return f


def test_hessian_equals_autograd_hessian_with_weights_and_regulariser():
    target = ik.Target(mlp(), ik.ClassificationTask(), regularizer=ik.L2Regularizer(0.1))
    data = classification_data(n=10)
    weights = torch.linspace(0.5, 2.0, 10, dtype=torch.float64)
    curv = ik.Curvature(target, data, kind="hessian", weights=weights)
    expected = torch.autograd.functional.hessian(_flat_objective(target, data, weights),
                                                 target.flat_params())
    torch.testing.assert_close(curv.dense(ik.Runtime(batch_size=3)), expected,
                               rtol=1e-10, atol=1e-12)
    assert curv.total_weight() == pytest.approx(float(weights.sum()))


def test_ggn_equals_jacobian_formula():
    model = mlp()
    target = ik.Target(model, ik.ClassificationTask())
    x, y = classification_data(n=6)
    flat = target.flat_params()
    expected = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
    for i in range(6):
        jac = torch.autograd.functional.jacobian(
            lambda f, i=i: target.outputs(target.space.unflatten(f), (x[i:i + 1], y[i:i + 1]))[0],
            flat)                                                  # [K, p]
        p = torch.softmax(model(x[i:i + 1])[0], 0)
        h = torch.diag(p) - torch.outer(p, p)
        expected += jac.T @ h @ jac / 6
    got = ik.Curvature(target, (x, y), kind="ggn").dense()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("task", [ik.ClassificationTask(), ik.RegressionTask()])
def test_true_fisher_equals_ggn_for_canonical_losses(task):
    """For cross-entropy on logits and squared error, E_y[g gᵀ] under the model = GGN."""
    regression = isinstance(task, ik.RegressionTask)
    model = mlp(d_out=2 if regression else 3)
    x, y = classification_data(n=8)
    if regression:
        y = torch.randn(8, 2, dtype=torch.float64)
    target = ik.Target(model, task)
    fisher = ik.Curvature(target, (x, y), kind="fisher").dense()
    ggn = ik.Curvature(target, (x, y), kind="ggn").dense()
    torch.testing.assert_close(fisher, ggn, rtol=1e-9, atol=1e-12)


def test_empirical_fisher_equals_gradient_outer_products():
    target = ik.Target(mlp(), ik.ClassificationTask())
    data = classification_data(n=9)
    g = gradients(target, data)
    got = ik.Curvature(target, data, kind="empirical_fisher").dense(ik.Runtime(batch_size=4))
    torch.testing.assert_close(got, g.T @ g / 9, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher", "empirical_fisher"])
def test_matvec_equals_dense(kind):
    target = ik.Target(mlp(), ik.ClassificationTask(), regularizer=ik.L2Regularizer(0.05))
    data = classification_data(n=10)
    curv = ik.Curvature(target, data, kind=kind,
                        weights=torch.arange(1, 11, dtype=torch.float64))
    runtime = ik.Runtime(batch_size=4)
    dense = curv.dense(runtime)
    vs = torch.randn(3, target.num_params, dtype=torch.float64)
    torch.testing.assert_close(curv.matvec(vs, runtime), vs @ dense, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(curv.matvec(vs[0], runtime), dense @ vs[0], rtol=1e-9,
                               atol=1e-11)
