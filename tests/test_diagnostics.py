"""Each diagnostic flags a constructed failure and passes a convex quadratic; numbers are held
against independent answers (closed forms, numpy on dense matrices built by hand)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

import influencekit as ik
from influencekit import diagnostics as dg
from influencekit.func.lanczos import extreme_eigenvalues, spectral_trace
from influencekit.inverse.base import InverseCurvature

from .diagnostics_toys import design, leverages, regression, saddle, tanh_net


def exact(target, data, kind="hessian", damping=0.0):
    return ik.Exact(damping=damping).fit(ik.Curvature(target, data, kind=kind))


def closed_form_scores(x, y, theta, xq, yq, damping=0.0):
    """Least squares, C = (2/n) AᵀA, g = 2 a (aᵀθ − y): s = g_qᵀ (C + λI)⁻¹ g_m, [q, n]."""
    a, aq = design(x), design(xq)
    n = a.shape[0]
    c = 2 * a.T @ a / n + damping * np.eye(a.shape[1])
    g = 2 * a * (a @ theta - y.numpy()[:, 0])[:, None]
    gq = 2 * aq * (aq @ theta - yq.numpy()[:, 0])[:, None]
    return gq @ np.linalg.solve(c, g.T)


def theta_of(target):
    return target.flat_params().numpy()  # [w..., b]


# -- Lanczos (pure function) --------------------------------------------------------------------
def test_lanczos_extremes_and_trace_match_eigvalsh():
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    e = torch.linspace(-3, 10, 40, dtype=torch.float64)
    m = (q * e) @ q.T
    lo, hi = extreme_eigenvalues(lambda v: v @ m, 40, steps=40)
    assert lo == pytest.approx(-3.0, abs=1e-9) and hi == pytest.approx(10.0, abs=1e-9)
    # with steps = p the quadrature is exact for every probe: tr|A| and tr(neg part) exact
    neg, tot = spectral_trace(lambda v: v @ m, 40, [lambda x: x.clamp_max(0).abs(), torch.abs],
                              probes=3, steps=40)
    # each probe gives zᵀ f(A) z, unbiased but not exact: compare with the same probes by hand
    gen = torch.Generator().manual_seed(0)
    z = (torch.randint(0, 2, (3, 40), generator=gen) * 2 - 1).to(torch.float64)
    f_neg = (q * e.clamp_max(0).abs()) @ q.T
    f_abs = (q * e.abs()) @ q.T
    assert neg == pytest.approx(float(torch.einsum("kp,pq,kq->k", z, f_neg, z).mean()), rel=1e-8)
    assert tot == pytest.approx(float(torch.einsum("kp,pq,kq->k", z, f_abs, z).mean()), rel=1e-8)


# -- convexity ----------------------------------------------------------------------------------
def test_convexity_passes_least_squares():
    target, data = regression()
    inverse = exact(target, data, "ggn", damping=1e-6)
    found, spectrum = dg.convexity_findings(target, inverse, data, data)
    a = design(data[0])
    e = np.linalg.eigvalsh(2 * a.T @ a / a.shape[0])
    assert spectrum.exact
    assert spectrum.min_eigenvalue == pytest.approx(e[0], rel=1e-10)
    assert spectrum.max_eigenvalue == pytest.approx(e[-1], rel=1e-10)
    assert [f.verdict for f in found] == ["pass", "pass", "pass"]
    assert found[1].value == 0.0
    assert found[2].value < 1e-12  # H = G exactly for least squares


def test_convexity_flags_saddle_with_exact_numbers():
    target, data = saddle()
    inverse = exact(target, data, "hessian", damping=5.0)
    found, spectrum = dg.convexity_findings(target, inverse, data, data)
    assert spectrum.min_eigenvalue == pytest.approx(-4.0, abs=1e-10)
    assert spectrum.max_eigenvalue == pytest.approx(2.0, abs=1e-10)
    eig, mass, _ = found
    assert eig.value == pytest.approx(-2.0, abs=1e-10)
    assert eig.verdict == "warn"  # damping 5 > 4 covers the negative curvature
    assert mass.value == pytest.approx(4.0 / 6.0, abs=1e-10) and mass.verdict == "fail"
    low = dg.eigenvalue_finding(spectrum, damping=1.0)
    assert low.verdict == "fail"


def test_lanczos_spectrum_estimate_matches_dense_on_tanh_net():
    target, data = tanh_net()
    dense = dg.hessian_spectrum(target, data)
    est = dg.hessian_spectrum(target, data, dense_max_params=0, steps=10, probes=64)
    assert dense.exact and not est.exact and "estimated" in est.how
    # p = 10: ten Lanczos steps span the space, so the extremes are exact
    assert est.min_eigenvalue == pytest.approx(dense.min_eigenvalue, rel=1e-6)
    assert est.max_eigenvalue == pytest.approx(dense.max_eigenvalue, rel=1e-6)
    # the mass is a stochastic (Hutchinson) estimate: within a loose statistical band
    assert est.negative_mass == pytest.approx(dense.negative_mass, abs=0.1)


def _hand_hessian_and_ggn(target, data):
    """Dense H and G of the tanh net by autograd on a hand-written flat forward."""
    x, y = data
    n = x.shape[0]

    def outputs(flat):
        w1, b1, w2, b2 = flat[:3].reshape(3, 1), flat[3:6], flat[6:9].reshape(1, 3), flat[9:]
        return (torch.tanh(x @ w1.T + b1) @ w2.T + b2)[:, 0]

    def loss(flat):
        return ((outputs(flat) - y[:, 0]) ** 2).mean()
    flat = target.flat_params()
    h = torch.autograd.functional.hessian(loss, flat)
    j = torch.autograd.functional.jacobian(outputs, flat)
    return h.numpy(), (2 * j.T @ j / n).numpy()


def test_hessian_ggn_gap_flags_tanh_net_against_dense():
    target, data = tanh_net()
    h, g = _hand_hessian_and_ggn(target, data)
    e = np.linalg.eigvalsh(h)
    assert e[0] < -1e-3  # the constructed failure: negative curvature at θ̂
    damping = 1e-3
    inverse = exact(target, data, "ggn", damping=damping)
    queries = (data[0][::3], data[1][::3])
    found, spectrum = dg.convexity_findings(target, inverse, data, queries)
    assert spectrum.min_eigenvalue == pytest.approx(e[0], rel=1e-8)
    assert spectrum.max_eigenvalue == pytest.approx(e[-1], rel=1e-8)
    neg_mass = np.abs(e[e < 0]).sum() / np.abs(e).sum()
    assert found[1].value == pytest.approx(neg_mass, rel=1e-8)
    gq = ik.Influence(target, inverse).query_gradients(queries).numpy()
    v = np.linalg.solve(g + damping * np.eye(10), gq.T).T
    gap = np.linalg.norm(v @ (h - g), axis=1) / np.linalg.norm(v @ g, axis=1)
    assert found[2].value == pytest.approx(gap.max(), rel=1e-6)
    assert found[0].verdict == "fail" and found[2].verdict == "fail"


# -- numeric stability --------------------------------------------------------------------------
class Richardson(InverseCurvature):
    """A deliberately crude solver: a few Richardson steps x ← x + ω (g − (C + λI) x)."""

    def __init__(self, damping=0.0, steps=2):
        self.damping = damping
        self.steps = steps

    def _fit(self, curvature, runtime):
        self.matrix_ = curvature.dense(runtime)

    def _solve(self, grads, runtime=None):
        a = self.matrix_ + self.damping * torch.eye(self.matrix_.shape[0], dtype=torch.float64)
        omega = 1.0 / float(torch.linalg.eigvalsh(a)[-1])
        x = torch.zeros_like(grads, dtype=torch.float64)
        for _ in range(self.steps):
            x = x + omega * (grads - x @ a)
        return x

    def _state_names(self):
        return ["matrix_"]


class Negated(ik.Exact):
    """Exact with the sign flipped: a method that disagrees completely."""

    def _solve(self, grads, runtime=None):
        return -super()._solve(grads)


def test_solver_residual_exact_passes_crude_solver_fails():
    target, data = regression(collinear=0.05)
    good = exact(target, data, "hessian", damping=1e-4)
    r_good = dg.solver_residuals(target, good, data, data)
    assert float(r_good.max()) < 1e-10
    assert dg.residual_finding(r_good).verdict == "pass"
    crude = Richardson(damping=1e-4, steps=2).fit(ik.Curvature(target, data, kind="hessian"))
    r = dg.solver_residuals(target, crude, data, data)
    a = design(data[0])
    c = 2 * a.T @ a / a.shape[0] + 1e-4 * np.eye(4)
    gq = ik.Influence(target, crude).query_gradients(data).numpy()
    x = crude.solve(torch.from_numpy(gq)).numpy()
    expected = np.linalg.norm(x @ c - gq, axis=1) / np.linalg.norm(gq, axis=1)
    np.testing.assert_allclose(r.numpy(), expected, rtol=1e-8)
    assert dg.residual_finding(r).verdict == "fail"


def test_method_agreement_against_scipy():
    target, data = regression()
    queries = (data[0][:3], data[1][:3])
    a = exact(target, data, "hessian", damping=1e-3)
    same = exact(target, data, "ggn", damping=1e-3)  # H = G for least squares
    assert dg.method_agreement(target, a, same, data, queries).value == pytest.approx(1.0)
    neg = Negated(damping=1e-3).fit(ik.Curvature(target, data, kind="ggn"))
    f = dg.method_agreement(target, a, neg, data, queries)
    assert f.verdict == "fail" and f.value == pytest.approx(-1.0)
    # an honest disagreement: identity-like inverse (huge damping) vs exact, checked by scipy
    big = exact(target, data, "ggn", damping=1e3)
    f = dg.method_agreement(target, a, big, data, queries)
    s1 = closed_form_scores(*data, theta_of(target), *queries, damping=1e-3)
    s2 = closed_form_scores(*data, theta_of(target), *queries, damping=1e3)
    rho = [stats.spearmanr(s1[i], s2[i]).statistic for i in range(3)]
    assert f.value == pytest.approx(min(rho), abs=1e-10)


def test_damping_sensitivity_flags_ill_conditioned_and_passes_well_conditioned():
    target, data = regression(n=60, collinear=1e-5)
    a = design(data[0])
    e, u = np.linalg.eigh(2 * a.T @ a / 60)
    assert e[-1] / e[0] > 1e9  # ill-conditioned
    # queries off the training manifold (x2 = -x1) load the near-null direction u_0
    xq = data[0][:3].clone()
    xq[:, 1] = -xq[:, 0]
    queries = (xq, data[1][:3])
    theta = theta_of(target)
    # too little damping: λ where the near-null direction's share of the scores equals the rest
    g = 2 * a * (a @ theta - data[1].numpy()[:, 0])[:, None]
    gq = 2 * design(xq)[0] * (design(xq)[0] @ theta - data[1].numpy()[0, 0])
    small = (gq @ u[:, 0]) * (g @ u[:, 0])
    rest = ((gq @ u[:, 1:]) / e[1:]) * (g @ u[:, 1:])
    damping = float(np.std(small) / np.std(rest.sum(1))) - e[0]
    f = dg.damping_sensitivity(target, exact(target, data, "hessian", damping), data, queries,
                               k=10)
    base = closed_form_scores(*data, theta, *queries, damping=damping)
    overlaps = []
    for alt in (damping / 10, damping * 10):
        other = closed_form_scores(*data, theta, *queries, damping=alt)
        for i in range(3):
            top = set(np.argsort(-base[i])[:10]) & set(np.argsort(-other[i])[:10])
            overlaps.append(len(top) / 10)
    assert f.value == pytest.approx(min(overlaps))
    assert f.verdict == "fail"
    well, wdata = regression(n=60)
    f = dg.damping_sensitivity(well, exact(well, wdata, "hessian", 1e-4), wdata,
                               (wdata[0][:3], wdata[1][:3]), k=10)
    assert f.value == 1.0 and f.verdict == "pass"


# -- training trajectory ------------------------------------------------------------------------
def test_checkpoint_agreement_flags_early_checkpoint():
    target, data = regression(n=50)
    queries = (data[0][:3], data[1][:3])
    inverse = exact(target, data, "hessian", 1e-6)
    theta = target.flat_params()
    near = theta + 1e-7 * torch.randn(theta.shape, dtype=torch.float64)
    early = torch.zeros_like(theta)  # initialisation: residuals are -y
    f = dg.checkpoint_agreement(target, inverse, data, queries, [near, early])
    final = closed_form_scores(*data, theta.numpy(), *queries, damping=1e-6)
    at = closed_form_scores(*data, early.numpy(), *queries, damping=1e-6)
    rho_early = np.mean([stats.spearmanr(final[i], at[i]).statistic for i in range(3)])
    assert f.details["spearman"][1] == pytest.approx(rho_early, abs=1e-10)
    assert f.details["spearman"][0] == pytest.approx(1.0, abs=1e-6)
    assert f.value == pytest.approx(rho_early, abs=1e-10) and f.verdict == "fail"
    assert dg.checkpoint_agreement(target, inverse, data, queries, [near]).verdict == "pass"
    # the user's model is untouched
    assert torch.equal(target.flat_params(), theta)


# -- parameter divergence -----------------------------------------------------------------------
def test_divergence_converged_gd_on_least_squares_matches_closed_form():
    target, data = regression(n=40)
    x, y = data
    a = design(x)
    e = np.linalg.eigvalsh(2 * a.T @ a / 40)
    setup = dg.TrainingSetup(steps=400, lr=1.0 / e[-1])
    inverse = exact(target, data, "hessian", 0.0)
    h = leverages(x)
    ind = [3, 7]
    for eps in (1.0, -1.0):
        curve = dg.parameter_divergence(target, inverse, data, data, ind, setup, epsilon=eps)
        err = curve.theta_relative_error()
        # converged: the reweighted least-squares optimum, Sherman-Morrison closed form
        expected = np.abs(eps * h[ind]) / (1 + eps * h[ind])
        np.testing.assert_allclose(err[-1].numpy(), expected, rtol=1e-6)
        # one step: θ moves by −lr ε ∇ℓ_m / (n + ε) (gradient of the renormalised mean)
        theta = theta_of(target)
        grad_m = 2 * a[ind] * (a[ind] @ theta - y.numpy()[ind, 0])[:, None]
        np.testing.assert_allclose(curve.real_theta_change[0].numpy(),
                                   -setup.lr * eps * grad_m / (40 + eps), rtol=1e-6, atol=1e-14)
    assert dg.divergence_finding([curve]).verdict == "pass"
    assert curve.measurement_correlation()[-1] > 0.99


def test_divergence_flags_saddle():
    target, data = saddle()
    inverse = exact(target, data, "hessian", damping=5.0)
    setup = dg.TrainingSetup(steps=64, lr=0.05)
    curve = dg.parameter_divergence(target, inverse, data, data, [0, 1], setup, epsilon=1.0)
    err = curve.theta_relative_error().mean(dim=1)
    # the perturbation along θ₁ grows like (1 + 4 lr)^T while the prediction stays fixed
    assert err[-1] > 10 * err[0]
    finding = dg.divergence_finding([curve])
    assert finding.verdict == "fail" and finding.value > 1.0


def test_group_divergence_real_runs_equal_a_numpy_loop_and_predictions_a_dense_solve():
    target, data = regression(n=40)
    x, y = data
    a, yy = design(x), y.numpy()[:, 0]
    n, theta = 40, theta_of(target)
    c = 2 * a.T @ a / n
    eta = 0.02 / np.linalg.eigvalsh(c)[-1]  # ηc ≪ 1: the regime where λ_T = 1/(ηT) holds
    setup = dg.TrainingSetup(steps=64, lr=eta)
    groups = [[3, 7, 11], [0, 20]]
    queries = (x[:5], y[:5])
    lams = [dg.horizon_damping(setup, 2), dg.horizon_damping(setup, 64)]
    assert lams == pytest.approx([1 / (2 * eta), 1 / (64 * eta)], rel=1e-12)
    inverses = [exact(target, data, "hessian", lam) for lam in lams]
    for eps in (0.5, -1.0):
        curves = dg.group_divergence(target, inverses, data, queries, groups, setup,
                                     epsilon=eps)
        assert [cv.damping for cv in curves] == pytest.approx(lams)
        for j, group in enumerate(groups):
            # real: full-batch GD on the weighted mean loss Σ w (aθ − y)² / Σ w from θ̂ (the
            # control run stays at θ̂, where the unweighted gradient is zero)
            w = np.ones(n)
            w[group] += eps
            th, real = theta.copy(), {}
            for t in range(1, 65):
                th = th - eta * 2 * a.T @ (w * (a @ th - yy)) / w.sum()
                real[t] = th - theta
            for h, t in enumerate(curves[0].horizons):
                np.testing.assert_allclose(curves[0].real_theta_change[h, j].numpy(), real[t],
                                           rtol=1e-7, atol=1e-12)
            # predicted: −(ε/n)(C + λI)⁻¹ Σ_{m∈G} g_m, g_m = 2 a_m (a_mᵀθ̂ − y_m)
            g_group = (2 * a[group] * (a[group] @ theta - yy[group])[:, None]).sum(axis=0)
            aq = design(queries[0])
            g_q = 2 * aq * (aq @ theta - queries[1].numpy()[:, 0])[:, None]
            for cv, lam in zip(curves, lams, strict=True):
                pred = -eps / n * np.linalg.solve(c + lam * np.eye(4), g_group)
                np.testing.assert_allclose(cv.predicted_theta_change[j].numpy(), pred,
                                           rtol=1e-9)
                np.testing.assert_allclose(cv.predicted_measurement_change[j].numpy(),
                                           g_q @ pred, rtol=1e-9, atol=1e-14)
                err = np.linalg.norm(real[64] - pred) / np.linalg.norm(pred)
                assert float(cv.theta_relative_error()[-1, j]) == pytest.approx(err, rel=1e-7)
    # the damping matched to the horizon describes it: at T = 2 the λ_2 prediction is closer
    # than the λ_64 one, at T = 64 the reverse
    err = [cv.theta_relative_error().mean(dim=1) for cv in curves]
    assert err[0][1] < err[1][1] and err[1][-1] < err[0][-1]
    lean = dg.group_divergence(target, inverses, data, queries, groups, setup, epsilon=-1.0,
                               keep_theta=False)
    assert lean[0].real_theta_change is None and lean[1].predicted_theta_change is None
    for full, small in zip(curves, lean, strict=True):
        torch.testing.assert_close(small.theta_cosine(), full.theta_cosine())
        torch.testing.assert_close(small.real_measurement_change, full.real_measurement_change)


def test_group_divergence_refuses_bad_groups_and_horizon_damping_needs_sgd():
    target, data = regression(n=10)
    inverse = exact(target, data, "hessian", 0.1)
    setup = dg.TrainingSetup(steps=2, lr=0.1)
    err = ik.errors.InfluenceKitError
    with pytest.raises(err, match="non-empty index lists"):
        dg.group_divergence(target, [inverse], data, data, [[1], []], setup)
    with pytest.raises(err, match=r"outside the training data \(n = 10\)"):
        dg.group_divergence(target, [inverse], data, data, [[10]], setup)
    with pytest.raises(err, match="plain SGD"):
        dg.horizon_damping(dg.TrainingSetup(optimizer="adam"), 4)


# -- first-order expansion ----------------------------------------------------------------------
def test_linearity_error_equals_eps_times_leverage():
    x_far = torch.tensor([6.0, 6.0, -6.0], dtype=torch.float64)
    for far, verdict in ((None, "pass"), (x_far, "fail")):
        target, data = regression(n=100, leverage_point=far)
        target.task = ik.RegressionTask(measurement="prediction")
        inverse = exact(target, data, "hessian", 0.0)
        queries = (data[0][:5], data[1][:5])
        errors = dg.linearity_errors(target, inverse, data, queries, [0, 1], (-1.0, 0.5))
        h = leverages(data[0])[[0, 1]]
        # L-BFGS in response.minimize stops near gradient 1e-8: ~1e-5 relative on the real change
        np.testing.assert_allclose(errors.numpy(), np.outer(h, [1.0, 0.5]), rtol=1e-4)
        assert dg.linearity_finding(errors, [0, 1], (-1.0, 0.5)).verdict == verdict


# -- check() ------------------------------------------------------------------------------------
def test_check_passes_least_squares_and_fails_saddle():
    target, data = regression(n=200)
    queries = (data[0][:3], data[1][:3])
    inverse = exact(target, data, "hessian", 1e-8)
    theta = target.flat_params()
    a = design(data[0])
    lr = 1.0 / np.linalg.eigvalsh(2 * a.T @ a / 200)[-1]
    report = dg.check(target, inverse, data, queries, other=exact(target, data, "ggn", 1e-8),
                      checkpoints=[theta + 1e-8], training=dg.TrainingSetup(steps=256, lr=lr),
                      epsilons=(-0.5, 0.5))
    verdicts = {f.name: f.verdict for f in report.findings}
    assert verdicts == {n: "pass" for n in verdicts} and len(verdicts) == 9, str(report)
    assert report.verdict == "pass"
    blob = json.dumps(report.to_json())
    assert '"verdict": "pass"' in blob
    assert report.to_html().count("<tr") == 10
    assert "negative curvature mass" in str(report)
    assert torch.equal(target.flat_params(), theta)

    s_target, s_data = saddle()
    s_inverse = exact(s_target, s_data, "hessian", damping=5.0)
    report = dg.check(s_target, s_inverse, s_data, s_data,
                      training=dg.TrainingSetup(steps=64, lr=0.05),
                      include=("convexity", "parameter divergence"))
    assert report.verdict == "fail"
    assert report.get("negative curvature mass").verdict == "fail"
    assert report.get("parameter divergence").verdict == "fail"


def test_check_time_estimates_scale_with_the_work_they_count():
    """The estimate of each check is linear in the measured unit costs and in the number of
    re-optimisations / training runs it counts; re-optimisation switches from Newton (a dense
    Hessian a step, ~p objective passes) to L-BFGS above 3,000 parameters."""
    from influencekit.diagnostics.cost import UnitCosts, estimate_seconds

    def est(costs, **kw):
        base = dict(num_params=500, n_query=3, include=ik.diagnostics.ALL)
        return estimate_seconds(costs, **{**base, **kw})

    one, two = est(UnitCosts(1e-3, 0.0)), est(UnitCosts(2e-3, 0.0))
    assert set(one) == set(ik.diagnostics.ALL)
    for name in ("convexity", "numeric stability", "parameter divergence",
                 "first-order expansion"):
        assert two[name] == pytest.approx(2 * one[name])
    costs = UnitCosts(1e-3, 0.0)
    assert est(costs, examples=4)["first-order expansion"] == pytest.approx(
        2 * est(costs, examples=2)["first-order expansion"])
    assert est(costs, epsilons=(-1, -0.5, 0.5, 1))["first-order expansion"] == pytest.approx(
        5 / 3 * one["first-order expansion"])
    assert est(costs, examples=4)["parameter divergence"] == pytest.approx(
        9 / 5 * one["parameter divergence"])
    # mini-batch steps (batch 8 of 800 examples) cost 1/100 of a full-batch step
    assert est(costs, step_fraction=8 / 800)["parameter divergence"] == pytest.approx(
        one["parameter divergence"] / 100)
    newton = est(costs, num_params=3000)["first-order expansion"]
    lbfgs = est(costs, num_params=3001)["first-order expansion"]
    assert lbfgs < newton / 10
    assert one["training trajectory"] == 0 < est(costs, checkpoints=2)["training trajectory"]


def test_check_divergence_takes_examples_its_mini_batches_visit():
    """With mini-batch continued training, an example that no batch contains cannot move θ:
    ``parameter_divergence`` warns and its relative error is exactly 1 at every horizon, and
    ``check`` takes its examples among the visited ones instead (largest |score|), names those
    it passed over, and its value equals a numpy loop over the same batch schedule."""
    n, steps, batch = 200, 4, 8
    target, data = regression(n=n)
    x, y = data
    a, yy, theta = design(x), y.numpy()[:, 0], theta_of(target)
    c = 2 * a.T @ a / n
    lr = 0.5 / np.linalg.eigvalsh(c)[-1]
    setup = dg.TrainingSetup(steps=steps, lr=lr, batch_size=batch, seed=0)
    schedule = [idx.numpy() for idx in ik.response.batch_schedule(n, batch_size=batch, seed=0,
                                                                   steps=steps)]
    seen = set(np.concatenate(schedule).tolist())
    assert dg.visited_examples(n, setup).tolist() == sorted(seen)
    s = closed_form_scores(x, y, theta, x[:1], y[:1])[0]
    order = np.argsort(-np.abs(s)).tolist()
    passed_over = [m for m in order[:2] if m not in seen]
    assert passed_over, "the toy must have a top-scored example that no batch visits"
    inverse = exact(target, data, "hessian", 0.0)

    with pytest.warns(UserWarning, match=r"in none of the 4 batches of 8.*at least 25 steps"):
        vacuous = dg.parameter_divergence(target, inverse, data, (x[:1], y[:1]),
                                          passed_over[:1], setup)
    assert torch.equal(vacuous.theta_relative_error(), torch.ones(3, 1, dtype=torch.float64))

    report = dg.check(target, inverse, data, (x[:1], y[:1]), training=setup, examples=2,
                      include=("parameter divergence",))
    expected = [m for m in order if m in seen][:2]
    assert report.context["divergence_examples"] == expected
    finding = report.get("parameter divergence")
    assert f"examples {passed_over} of larger |score|" in finding.how
    assert "at least 25 steps" in finding.how and "batch_size=None" in finding.how
    errors = []
    for eps in (1.0, -1.0):
        for m in expected:
            w = np.ones(n)
            w[m] += eps
            control, weighted = theta.copy(), theta.copy()
            for idx in schedule:
                control -= lr * 2 * a[idx].T @ (a[idx] @ control - yy[idx]) / len(idx)
                weighted -= (lr * 2 * a[idx].T @ (w[idx] * (a[idx] @ weighted - yy[idx]))
                             / w[idx].sum())
            g_m = 2 * a[m] * (a[m] @ theta - yy[m])
            pred = -eps / n * np.linalg.solve(c, g_m)
            errors.append(np.linalg.norm(weighted - control - pred) / np.linalg.norm(pred))
    assert min(abs(e - 1.0) for e in errors) > 1e-3        # measured, not the vacuous 1
    assert finding.value == pytest.approx(np.mean(errors), rel=1e-6)
