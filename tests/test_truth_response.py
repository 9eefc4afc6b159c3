"""Ground truth: retraining, leave-one-out, the PBRF and the resumable results store."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.errors import StoreError
from influencekit.response.pbrf import output_bregman, solve_response
from influencekit.response.retrain import (
    LBFGSRetrainer,
    SGDRetrainer,
    leave_one_out_retrained,
    subset_retraining,
)
from influencekit.storage import ResultsArray

MU = 0.1  # L2 strength


def ridge_problem(n=20, d=3, measurement="loss", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)[:d, None]
    y = y + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1).to(torch.float64)
    target = ik.Target(model, ik.RegressionTask(measurement=measurement),
                       regularizer=ik.L2Regularizer(MU))
    theta = ridge_solution(x.numpy(), y.numpy()[:, 0], np.ones(n, bool))
    ik.write_params(target, torch.from_numpy(theta))
    return target, (x, y)


def design(x):
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)  # [weight..., bias]


def ridge_solution(x, y, keep):
    """argmin (1/k) Σ_keep (x̃ᵀθ − y)² + (MU/2)‖θ‖², closed form."""
    a = design(x[keep])
    k = a.shape[0]
    return np.linalg.solve(2 * a.T @ a / k + MU * np.eye(a.shape[1]), 2 * a.T @ y[keep] / k)


def logistic_problem(n=40, d=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    model = nn.Linear(d, classes).to(torch.float64)
    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(0.05))
    ik.write_params(target, ik.minimize(target, (x, y), grad_tol=1e-12).params)
    return target, (x, y)


# -- retraining and leave-one-out ---------------------------------------------------------------
def test_lbfgs_retrainer_matches_ridge_closed_form():
    target, (x, y) = ridge_problem()
    keep = np.ones(20, bool)
    keep[[2, 7, 11]] = False
    theta = LBFGSRetrainer(grad_tol=1e-12).retrain(target, (x, y), np.flatnonzero(keep),
                                                   init=torch.zeros(4, dtype=torch.float64))
    expected = ridge_solution(x.numpy(), y.numpy()[:, 0], keep)
    np.testing.assert_allclose(theta.numpy(), expected, atol=1e-9)


def test_loo_cold_and_warm_agree_on_strictly_convex_model():
    target, train = logistic_problem()
    query = (train[0][:5], train[1][:5])
    retrainer = LBFGSRetrainer(grad_tol=1e-12)
    warm = leave_one_out_retrained(target, train, [0, 3, 9], query, retrainer)
    cold = leave_one_out_retrained(target, train, [0, 3, 9], query, retrainer,
                                   init=torch.zeros(target.num_params, dtype=torch.float64))
    assert warm.shape == (5, 3)
    assert warm.abs().max() > 1e-4  # the removals do change the query losses
    np.testing.assert_allclose(warm.numpy(), cold.numpy(), atol=1e-8)


def test_loo_retrained_matches_ridge_closed_form_change():
    target, (x, y) = ridge_problem()
    query = (x[:4], y[:4])
    loo = leave_one_out_retrained(target, (x, y), [5], query, LBFGSRetrainer(grad_tol=1e-12))
    keep = np.ones(20, bool)
    keep[5] = False
    a = design(x.numpy()[:4])
    full = ridge_solution(x.numpy(), y.numpy()[:, 0], np.ones(20, bool))
    minus = ridge_solution(x.numpy(), y.numpy()[:, 0], keep)
    yq = y.numpy()[:4, 0]
    expected = (a @ minus - yq) ** 2 - (a @ full - yq) ** 2
    np.testing.assert_allclose(loo[:, 0].numpy(), expected, atol=1e-9)


def test_sgd_retrainer_full_batch_converges_to_closed_form():
    target, (x, y) = ridge_problem()
    sgd = SGDRetrainer(epochs=3000, lr=0.2, batch_size=20, optimizer="sgd",
                       dtype=torch.float64)
    theta = sgd.retrain(target, (x, y), np.arange(20), seed=1,
                        init=torch.zeros(4, dtype=torch.float64))
    expected = ridge_solution(x.numpy(), y.numpy()[:, 0], np.ones(20, bool))
    np.testing.assert_allclose(theta.numpy(), expected, atol=1e-8)


# -- PBRF -----------------------------------------------------------------------------------------
def test_bregman_of_cross_entropy_is_kl_and_of_squared_error_is_squared_distance():
    g = torch.Generator().manual_seed(3)
    y, ys = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g,
                                                                             dtype=torch.float64)
    labels = torch.randint(0, 4, (6,), generator=g)
    d = output_bregman(ik.ClassificationTask(), y, ys, labels)
    ps, logp = ys.softmax(1), y.log_softmax(1)
    kl = (ps * (ps.log() - logp)).sum(1)
    np.testing.assert_allclose(d.numpy(), kl.numpy(), atol=1e-13)
    t = torch.randn(6, 4, generator=g, dtype=torch.float64)
    d2 = output_bregman(ik.RegressionTask(), y, ys, t)
    np.testing.assert_allclose(d2.numpy(), ((y - ys) ** 2).sum(1).numpy(), atol=1e-13)


@pytest.mark.parametrize("epsilon", [-1.0, 0.5])
def test_linearised_pbrf_equals_damped_ggn_influence_exactly(epsilon):
    """Linear model, squared error: P is exactly quadratic with Hessian C_GGN + λI."""
    damping = 0.03
    target, (x, y) = ridge_problem(measurement="prediction")
    n, m = 20, 6
    sol = solve_response(target, (x, y), m, damping=damping, epsilon=epsilon,
                         mode="pbrf_linear", grad_tol=1e-13)
    inverse = ik.Exact(damping=damping).fit(ik.Curvature(target, (x, y), kind="ggn"))
    scorer = ik.Influence(target, inverse)
    dtheta = sol.params - target.flat_params(torch.float64)
    predicted = epsilon * scorer.parameter_influence((x[m:m + 1], y[m:m + 1]))[0]
    np.testing.assert_allclose(dtheta.numpy(), predicted.numpy(), rtol=1e-8, atol=1e-12)
    # The measurement (the prediction, linear in θ) changes by exactly −ε·s/n.
    query = (x[:5], y[:5])
    s = scorer.pairwise(query, (x[m:m + 1], y[m:m + 1]))[:, 0]
    change = ik.response.measure(target, sol.params, query, ik.Runtime()) - \
        ik.response.measure(target, target.flat_params(torch.float64), query, ik.Runtime())
    np.testing.assert_allclose(change.numpy(), (-epsilon * s / n).numpy(), rtol=1e-8,
                               atol=1e-12)


@pytest.mark.parametrize("epsilon", [-1.0, 0.5])
def test_pbrf_linear_squared_error_matches_closed_form(epsilon):
    """Full PBRF (loss not linearised): Δ = −(ε/n)(C + λI + (ε/n)(H_m + μI))⁻¹ g_m exactly."""
    damping = 0.03
    target, (x, y) = ridge_problem()
    n, m = 20, 6
    sol = solve_response(target, (x, y), m, damping=damping, epsilon=epsilon, mode="pbrf",
                         grad_tol=1e-13)
    a = design(x.numpy())
    theta = target.flat_params(torch.float64).numpy()
    c = 2 * a.T @ a / n + MU * np.eye(4)
    g_m = 2 * (a[m] @ theta - y.numpy()[m, 0]) * a[m] + MU * theta
    h_m = 2 * np.outer(a[m], a[m]) + MU * np.eye(4)
    expected = -(epsilon / n) * np.linalg.solve(c + damping * np.eye(4) + (epsilon / n) * h_m,
                                                g_m)
    np.testing.assert_allclose((sol.params.numpy() - theta), expected, rtol=1e-8, atol=1e-13)


def test_pbrf_derivative_is_ggn_influence_for_a_nonlinear_classifier():
    """d θ_PBRF / dε at 0 = −(1/n)(C_GGN + λI)⁻¹ g_m for an MLP (central difference, O(ε²))."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.float64)
    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-2))
    ik.write_params(target, ik.minimize(target, (x, y), grad_tol=1e-9, max_iter=300).params)
    damping, eps, m = 0.05, 1e-3, 4
    plus = solve_response(target, (x, y), m, damping=damping, epsilon=eps, grad_tol=1e-14)
    minus = solve_response(target, (x, y), m, damping=damping, epsilon=-eps, grad_tol=1e-14)
    derivative = (plus.params - minus.params) / (2 * eps)
    inverse = ik.Exact(damping=damping).fit(ik.Curvature(target, (x, y), kind="ggn"))
    expected = ik.Influence(target, inverse).parameter_influence((x[m:m + 1], y[m:m + 1]))[0]
    np.testing.assert_allclose(derivative.numpy(), expected.numpy(), rtol=1e-4,
                               atol=1e-5 * float(expected.abs().max()))


# -- the resumable store --------------------------------------------------------------------------
class _Interrupt(Exception):
    pass


class _Counting:
    """Wraps a retrainer; raises after ``stop_after`` calls (a simulated kill)."""

    def __init__(self, inner, stop_after=None):
        self.inner, self.stop_after, self.calls = inner, stop_after, 0

    def retrain(self, *args, **kwargs):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise _Interrupt()
        self.calls += 1
        return self.inner.retrain(*args, **kwargs)

    def __repr__(self):
        return repr(self.inner)


def test_subset_retraining_resumes_after_interruption(tmp_path):
    target, (x, y) = ridge_problem()
    query = (x[:6], y[:6])
    rng = np.random.default_rng(0)
    masks = rng.random((8, 20)) < 0.5
    retrainer = LBFGSRetrainer(grad_tol=1e-12)
    reference = subset_retraining(target, (x, y), masks, query, retrainer)
    # Independent answer for the rows: closed-form ridge on each subset.
    a = design(x.numpy()[:6])
    for row in range(8):
        theta = ridge_solution(x.numpy(), y.numpy()[:, 0], masks[row])
        np.testing.assert_allclose(reference[row], (a @ theta - y.numpy()[:6, 0]) ** 2,
                                   atol=1e-9)
    first = _Counting(retrainer, stop_after=4)
    with pytest.raises(_Interrupt):
        subset_retraining(target, (x, y), masks, query, first, store=tmp_path / "lds")
    stored = ResultsArray.open(tmp_path / "lds", (8, 6), "float64",
                               json.loads((tmp_path / "lds" / "meta.json").read_text())["config"])
    assert stored.done().tolist() == [True] * 4 + [False] * 4
    second = _Counting(retrainer)
    resumed = subset_retraining(target, (x, y), masks, query, second, store=tmp_path / "lds")
    assert second.calls == 4  # only the rows left
    np.testing.assert_array_equal(resumed, reference)


def test_results_store_rejects_mismatch_and_corruption(tmp_path):
    folder = tmp_path / "r"
    arr = ResultsArray.open(folder, (3, 2), config={"a": 1})
    arr.write(0, [1.0, 2.0])
    with pytest.raises(StoreError, match="another run"):
        ResultsArray.open(folder, (4, 2), config={"a": 1})
    with pytest.raises(StoreError, match="another run"):
        ResultsArray.open(folder, (3, 2), config={"a": 2})
    reopened = ResultsArray.open(folder, (3, 2), config={"a": 1})
    assert reopened.pending() == [1, 2]
    np.testing.assert_array_equal(reopened.values()[0], [1.0, 2.0])
    data = (folder / "values.npy").read_bytes()
    (folder / "values.npy").write_bytes(data[:40])  # truncate
    with pytest.raises(StoreError, match="delete the folder"):
        ResultsArray.open(folder, (3, 2), config={"a": 1})
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        ResultsArray.open(folder, (3, 2), config={"a": 1})


def test_minibatch_pbrf_solver_reaches_the_lbfgs_solution():
    """Adam on the PBRF objective (one batch = all data) converges to the L-BFGS minimiser."""
    from influencekit.response.pbrf import solve_response_minibatch

    target, (x, y) = ridge_problem()
    ref = solve_response(target, (x, y), 6, damping=0.03, epsilon=-1.0, grad_tol=1e-13)
    adam = solve_response_minibatch(target, (x, y), 6, damping=0.03, epsilon=-1.0, epochs=4000,
                                    lr=3e-4, batch_size=20, dtype=torch.float64)
    theta = target.flat_params(torch.float64)
    rel = (adam.params - ref.params).norm() / (ref.params - theta).norm()
    assert rel < 1e-7
