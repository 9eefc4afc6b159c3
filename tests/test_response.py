"""Influence against what really happens: finite differences, closed-form and real LOO."""

import numpy as np
import torch
from torch import nn

import influencekit as ik
from influencekit.testing import solve_thesis, thesis_data, thesis_target

from .helpers import breast_cancer_logreg, pearson


def test_response_slope_equals_parameter_influence_thesis():
    target = thesis_target()
    data = thesis_data()
    answer = solve_thesis()
    h = 1e-4
    for m in range(3):
        curve = ik.response_curve(target, data, m, [-h, h], data,
                                  parameter_influence=torch.tensor(answer.param_influence[m]))
        slope = (curve.theta[1] - curve.theta[0]) / (2 * h)
        np.testing.assert_allclose(slope, answer.param_influence[m], atol=1e-5)
        # the loss response's slope is the loss influence, row m
        fslope = (curve.measurement[1] - curve.measurement[0]) / (2 * h)
        np.testing.assert_allclose(fslope, answer.loss_influence[m], atol=1e-5)


def test_response_slope_equals_influence_weighted_logistic():
    """Non-uniform base weights and a regulariser: the slope at ε = 0 is −(1/W) C⁻¹(∇ℓ_m + ∇R)."""
    target, (x, y), query = breast_cancer_logreg(n_train=60, n_query=5)
    weights = torch.linspace(0.5, 1.5, 60, dtype=torch.float64)
    result = ik.minimize(target, (x, y), weights=weights, grad_tol=1e-13)
    ik.write_params(target, result.params)
    inverse = ik.Exact().fit(ik.Curvature(target, (x, y), kind="hessian", weights=weights))
    assert inverse.n_train_ == float(weights.sum())
    scorer = ik.Influence(target, inverse)
    m, h = 7, 1e-4
    curve = ik.response_curve(target, (x, y), m, [-h, h], query, weights=weights,
                              inverse=inverse, grad_tol=1e-13)
    slope_theta = (curve.theta[1] - curve.theta[0]) / (2 * h)
    expected = scorer.parameter_influence((x[m:m + 1], y[m:m + 1]))[0]
    torch.testing.assert_close(slope_theta, expected, atol=1e-5, rtol=1e-5)
    slope_f = (curve.measurement[1] - curve.measurement[0]) / (2 * h)
    scores = scorer.pairwise(query, (x[m:m + 1], y[m:m + 1]))[:, 0]
    torch.testing.assert_close(slope_f, ik.conventions.weight_derivative(scores, inverse.n_train_),
                               atol=1e-5, rtol=1e-5)


def test_ridge_removal_effect_matches_closed_form_loo():
    """Ridge: L = (1/n)Σ(xᵢᵀθ − yᵢ)² + (α/2)‖θ‖²; LOO refits solved exactly with numpy."""
    rng = np.random.default_rng(1)
    n, d, alpha = 40, 5, 0.1
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    xq = rng.normal(size=(8, d))

    def fit(rows):
        xs, ys = x[rows], y[rows]
        return np.linalg.solve(2 * xs.T @ xs / len(rows) + alpha * np.eye(d),
                               2 * xs.T @ ys / len(rows))

    theta = fit(np.arange(n))
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(theta)[None])
    target = ik.Target(model, ik.RegressionTask(measurement="prediction"),
                       regularizer=ik.L2Regularizer(alpha))
    train = (torch.tensor(x), torch.tensor(y)[:, None])
    query = (torch.tensor(xq), torch.zeros(8, 1, dtype=torch.float64))
    inverse = ik.Exact().fit(ik.Curvature(target, train, kind="hessian"))
    scores = ik.Influence(target, inverse).pairwise(query, train)       # [8, n]
    predicted = ik.conventions.removal_effect(scores, n).numpy()
    real = np.stack([xq @ (fit(np.delete(np.arange(n), m)) - theta) for m in range(n)], axis=1)
    assert pearson(predicted, real) > 0.99
    # and the library's own retraining agrees with the closed form
    loo = ik.leave_one_out(target, train, [0, 13], query)
    np.testing.assert_allclose(loo.numpy(), real[:, [0, 13]], atol=1e-8)


def test_logistic_regression_influence_vs_real_leave_one_out():
    target, train, query = breast_cancer_logreg(n_train=120, n_query=30)
    inverse = ik.Exact().fit(ik.Curvature(target, train, kind="hessian"))
    scores = ik.Influence(target, inverse).pairwise(query, train)        # [30, 120]
    predicted = ik.conventions.removal_effect(scores, inverse.n_train_)
    removed = list(range(0, 120, 3))
    real = ik.leave_one_out(target, train, removed, query)               # [30, 40]
    assert pearson(predicted[:, removed], real) > 0.95
    # cold start reaches the same optimum (convex): retraining does not depend on the start
    cold = ik.leave_one_out(target, train, removed[:3], query, warm_start=False)
    np.testing.assert_allclose(cold.numpy(), real[:, :3].numpy(), atol=1e-6)


def test_response_curve_endpoint_is_leave_one_out():
    target = thesis_target()
    data = thesis_data()
    answer = solve_thesis()
    curve = ik.response_curve(target, data, 0, [-1.0, 0.0, 0.5], data,
                              parameter_influence=torch.tensor(answer.param_influence[0]))
    # removing (0, 0) leaves the line through (1, 1.5) and (2, 2): m = 0.5, b = 1
    np.testing.assert_allclose(curve.theta[0].numpy(), [0.5, 1.0], atol=1e-8)
    np.testing.assert_allclose(curve.theta[1].numpy(), curve.theta_hat.numpy(), atol=1e-10)
    np.testing.assert_allclose(curve.predicted_theta[2].numpy(),
                               curve.theta_hat.numpy() + 0.5 * np.array(answer.param_influence[0]))


def test_hypothetical_example_matches_reoptimised_response():
    """A point NOT in the training set: give it weight ε (base weight 0) and re-optimise."""
    target, (x, y), query = breast_cancer_logreg(n_train=50, n_query=4)
    inverse = ik.Exact().fit(ik.Curvature(target, (x, y), kind="hessian"))
    new_x, new_y = x[:1] * 0.5 + 0.3, 1 - y[:1]      # an off-distribution, relabelled point
    scores = ik.Influence(target, inverse).hypothetical(query, (new_x, new_y))[:, 0]
    extended = (torch.cat([x, new_x]), torch.cat([y, new_y]))
    base = torch.ones(51, dtype=torch.float64)
    base[50] = 0.0
    h = 1e-4
    curve = ik.response_curve(target, extended, 50, [h, 2 * h], query, weights=base,
                              parameter_influence=torch.zeros(target.num_params),
                              grad_tol=1e-13)
    # one-sided second-order difference (ε must stay >= 0): f'(0) ≈ (4f(h) − f(2h) − 3f(0))/2h
    slope = (4 * curve.measurement[0] - curve.measurement[1] - 3 * curve.measurement_hat) / (2 * h)
    torch.testing.assert_close(slope, ik.conventions.weight_derivative(scores, 50.0),
                               atol=1e-5, rtol=1e-5)
