"""Metrics and baseline scorers against independent numpy/scipy/sklearn computations."""

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score
from torch import nn

import influencekit as ik
from influencekit.evaluation import (
    auc,
    flip_labels,
    lds,
    loo_correlation,
    mislabel_detection,
    sample_subsets,
)
from influencekit.evaluation.decomposition import correlation_table
from influencekit.func.grads import per_example_gradients_loop
from influencekit.grads.projection import RandomProjection
from influencekit.scoring import TRAK, TracIn


def test_lds_equals_independent_scipy_computation():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(7, 30))
    masks = sample_subsets(30, 0.5, 25, seed=3)
    assert masks.sum(1).tolist() == [15] * 25
    outputs = -(masks @ scores.T) + rng.normal(scale=2.0, size=(25, 7))
    result = lds(scores, masks, outputs)
    expected = []
    for q in range(7):
        pred = [-scores[q, masks[s]].sum() for s in range(25)]
        expected.append(stats.spearmanr(pred, outputs[:, q]).statistic)
    np.testing.assert_allclose(result.per_query, expected, atol=1e-12)
    assert abs(result.mean - np.mean(expected)) < 1e-12
    assert abs(result.stderr - stats.sem(expected)) < 1e-12


def test_loo_correlation_equals_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 10)), rng.normal(size=(4, 10))
    r = loo_correlation(a, b)
    assert abs(r["pearson"] - stats.pearsonr(a.ravel(), b.ravel()).statistic) < 1e-12
    assert abs(r["spearman"] - stats.spearmanr(a.ravel(), b.ravel()).statistic) < 1e-12
    per = [stats.pearsonr(x, y).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(r["pearson_per_query"].per_query, per, atol=1e-12)


def test_mislabel_auc_equals_sklearn_and_flips_change_labels():
    labels = np.arange(200) % 10
    new, flipped = flip_labels(labels, 0.1, 10, seed=0)
    assert flipped.sum() == 20 and (new[flipped] != labels[flipped]).all()
    assert (new[~flipped] == labels[~flipped]).all()
    rng = np.random.default_rng(2)
    s = rng.normal(size=200) + 1.5 * flipped
    s[:10] = s[10:20]  # ties
    assert abs(auc(s, flipped) - roc_auc_score(flipped, s)) < 1e-12
    out = mislabel_detection(s, flipped, checked=(0.1, 1.0))
    order = np.argsort(-s, kind="stable")
    assert out["found"][0.1] == flipped[order[:20]].sum() / 20
    assert out["found"][1.0] == 1.0


def test_correlation_table_chains_steps():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(3, 5))
    b, c = a + 0.1 * rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    rows = correlation_table({"a": a, "b": b, "c": c})
    assert rows[0]["pearson_vs_previous"] is None
    assert abs(rows[1]["pearson_vs_previous"] - np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 1e-12
    assert abs(rows[2]["pearson_vs_first"] - np.corrcoef(a.ravel(), c.ravel())[0, 1]) < 1e-12


def _classifier(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(25, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (25,), generator=g)
    model = nn.Linear(3, 3).to(torch.float64)
    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(0.1))
    ik.write_params(target, ik.minimize(target, (x, y), grad_tol=1e-9).params)
    return target, (x, y)


def _loop_grads(target, fn, data):
    _, grads = per_example_gradients_loop(fn, target.params(torch.float64), data)
    return target.space.flatten(grads, batch_dims=1)


def test_tracin_one_checkpoint_equals_lr_times_gradient_products():
    target, (x, y) = _classifier()
    ckpt = target.flat_params(torch.float64) * 0.7  # not the optimum: gradients differ
    ik.write_params(target, ckpt)
    query, train = (x[:4], y[:4]), (x[4:], y[4:])
    gq = _loop_grads(target, target.measurements, query)
    reg = 0.1 * ckpt  # ∇R of L2(0.1)
    gm = _loop_grads(target, target.losses, train) + reg
    scores = TracIn(target, [ckpt], learning_rates=0.3).pairwise(query, train)
    np.testing.assert_allclose(scores.numpy(), (0.3 * gq @ gm.T).numpy(), atol=1e-12)
    # A state dict works the same, and two checkpoints add up.
    sd = target.space.unflatten(ckpt)
    two = TracIn(target, [ckpt, sd], learning_rates=[0.3, 0.2]).pairwise(query, train)
    np.testing.assert_allclose(two.numpy(), (0.5 * gq @ gm.T).numpy(), atol=1e-12)


def _margin_fn(target):
    def margin(params, batch):
        logits = target.outputs(params, batch)
        p = logits.softmax(1).gather(1, batch[1][:, None])[:, 0]
        return torch.log(p) - torch.log1p(-p)
    return margin


def test_trak_without_projection_equals_empirical_kernel_formula():
    target, (x, y) = _classifier()
    query, train = (x[:5], y[:5]), (x[5:], y[5:])
    lam = 0.05
    phi = _loop_grads(target, _margin_fn(target), train).numpy()
    phi_q = _loop_grads(target, _margin_fn(target), query).numpy()
    with torch.no_grad():
        probs = target.outputs(target.params(torch.float64), train).softmax(1)
    q = 1 - probs.gather(1, train[1][:, None])[:, 0].numpy()
    n = phi.shape[0]
    expected = phi_q @ np.linalg.solve(phi.T @ phi / n + lam * np.eye(phi.shape[1]), phi.T) * q
    got = TRAK(target, damping=lam).pairwise(query, train)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)
    # A projection to k >= p dimensions keeps the scores up to the projection's conditioning:
    # with an orthogonal-like Gaussian P (k >> p) scores stay highly correlated.
    proj = TRAK(target, damping=lam, projection=RandomProjection(400, "rademacher", seed=1))
    corr = np.corrcoef(proj.pairwise(query, train).numpy().ravel(), expected.ravel())[0, 1]
    assert corr > 0.95


def test_random_projection_preserves_inner_products_on_average():
    g = torch.randn(3, 50, dtype=torch.float64)
    est = []
    for seed in range(200):
        pg = RandomProjection(20, "gaussian", seed)(g)
        est.append((pg @ pg.T).numpy())
    np.testing.assert_allclose(np.mean(est, axis=0), (g @ g.T).numpy(),
                               atol=0.1 * float((g * g).sum(1).max()))


def test_removal_curve_matches_ridge_closed_form():
    from influencekit.evaluation import removal_curve
    from influencekit.response.retrain import LBFGSRetrainer

    from .test_truth_response import design, ridge_problem, ridge_solution

    target, (x, y) = ridge_problem()
    scores = np.linspace(1.0, -1.0, 20)[::-1].copy()  # example 19 ranked first, then 18, ...
    curve = removal_curve(target, (x, y), (x, y), 3, scores, [1, 4],
                          LBFGSRetrainer(grad_tol=1e-12), random_seed=5)
    a, yy = design(x.numpy())[3], y.numpy()[:, 0]
    full = (a @ ridge_solution(x.numpy(), yy, np.ones(20, bool)) - yy[3]) ** 2
    shuffled = np.random.default_rng(5).permutation(20)
    for i, k in enumerate([1, 4]):
        keep = np.ones(20, bool)
        keep[np.arange(19, 19 - k, -1)] = False
        expected = (a @ ridge_solution(x.numpy(), yy, keep) - yy[3]) ** 2 - full
        assert abs(curve["top"][i] - expected) < 1e-9
        keep = np.ones(20, bool)
        keep[shuffled[:k]] = False
        expected = (a @ ridge_solution(x.numpy(), yy, keep) - yy[3]) ** 2 - full
        assert abs(curve["random"][i] - expected) < 1e-9


def test_gap_decomposition_on_a_convex_model():
    """Convex: cold and warm LOO coincide; PBRF agrees with its linearisation closely."""
    from influencekit.evaluation import gap_decomposition
    from influencekit.response.retrain import LBFGSRetrainer

    target, (x, y) = _classifier()
    out = gap_decomposition(target, (x, y), [0, 5, 9, 13], (x[:6], y[:6]), damping=0.01,
                            cold_retrainer=LBFGSRetrainer(grad_tol=1e-12),
                            cold_init=torch.zeros(target.num_params, dtype=torch.float64))
    ch = out["changes"]
    assert list(ch) == ["cold_loo", "warm_loo", "proximal", "pbrf", "linearised_pbrf"]
    np.testing.assert_allclose(ch["cold_loo"].numpy(), ch["warm_loo"].numpy(), atol=1e-8)
    table = {r["step"]: r for r in out["table"]}
    assert table["warm_loo"]["pearson_vs_previous"] > 1 - 1e-9
    assert table["linearised_pbrf"]["pearson_vs_previous"] > 0.99
    # Linearised PBRF = Exact GGN influence removal effect s/n, computed independently here.
    c = ik.Curvature(target, (x, y), kind="ggn").dense()
    sc = ik.Influence(target, ik.Exact(0.01).fit(ik.Curvature(target, (x, y))))
    gq, gm = sc.query_gradients((x[:6], y[:6])), sc.train_gradients((x, y))[[0, 5, 9, 13]]
    expected = gq @ torch.linalg.solve(c + 0.01 * torch.eye(c.shape[0], dtype=c.dtype), gm.T)
    np.testing.assert_allclose(ch["linearised_pbrf"].numpy(), (expected / 25).numpy(),
                               atol=1e-12)
