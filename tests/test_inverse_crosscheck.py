"""Cross-checks between inverse methods in float64, and their error reporting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.errors import ConvergenceError
from influencekit.storage import load_inverse, save_inverse

from .inverse_problems import blocks_problem, diagonal_problem, low_rank_problem

DAMPING = 1e-2


def _mlp_curvature(kind="ggn", regularizer=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.float64)
    target = ik.Target(model, ik.ClassificationTask(), regularizer=regularizer)
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    return ik.Curvature(target, (x, y), kind=kind)


def _rows(p, k=3, seed=0):
    return torch.randn(k, p, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def mlp():
    curvature = _mlp_curvature()
    dense = curvature.dense()
    return curvature, dense


def test_full_rank_arnoldi_equals_cg_equals_exact(mlp):
    curvature, dense = mlp
    p = dense.shape[0]
    g = _rows(p)
    exact = ik.Exact(damping=DAMPING).fit(curvature).solve(g)
    direct = torch.linalg.solve(dense + DAMPING * torch.eye(p, dtype=torch.float64), g.T).T
    cg = ik.CG(damping=DAMPING, max_iter=4 * p, tol=1e-12).fit(curvature)
    arnoldi = ik.Arnoldi(damping=DAMPING, rank=p, n_iter=p).fit(curvature)
    assert _rel(exact, direct) < 1e-10
    assert _rel(cg.solve(g), exact) < 1e-6
    assert _rel(arnoldi.solve(g), exact) < 1e-6
    assert bool((cg.last_residuals_ <= 1e-12).all())
    assert arnoldi.fit_info_["trace_method"] == "exact"
    assert arnoldi.fit_info_["spectrum_kept"] == pytest.approx(1.0, rel=1e-9)


def test_arnoldi_top_eigenpairs_and_spectrum_share(mlp):
    curvature, dense = mlp
    p = dense.shape[0]
    values = torch.linalg.eigvalsh(dense)
    rank = 4
    arnoldi = ik.Arnoldi(damping=DAMPING, rank=rank, n_iter=p, trace_probes=p).fit(curvature)
    top = values.flip(0)[:rank]
    torch.testing.assert_close(arnoldi.eigenvalues_, top, rtol=1e-8, atol=1e-12)
    assert arnoldi.fit_info_["spectrum_kept"] == pytest.approx(float(top.sum() / values.sum()),
                                                               rel=1e-8)
    # complement="drop": the exact damped inverse projected on the kept eigenspace.
    g = _rows(p)
    v = arnoldi.eigenvectors_
    exact = ik.Exact(damping=DAMPING).fit(curvature).solve(g)
    torch.testing.assert_close(arnoldi.solve(g), exact @ v.T @ v, rtol=1e-7, atol=1e-10)


def test_arnoldi_hutchinson_trace_is_unbiased(mlp):
    curvature, dense = mlp
    probes = 16
    arnoldi = ik.Arnoldi(damping=DAMPING, rank=2, trace_probes=probes, seed=3).fit(curvature)
    info = arnoldi.fit_info_
    assert info["trace_method"] == "hutchinson"
    # Var of a Rademacher Hutchinson sample: 2 Σ_{i≠j} C_ij²; allow 5 standard errors.
    off = dense - torch.diag(torch.diagonal(dense))
    std_error = math.sqrt(2 * float((off**2).sum()) / probes)
    assert abs(info["trace"] - float(torch.trace(dense))) < 5 * std_error


def test_arnoldi_low_rank_with_damping_complement_is_exact():
    problem = low_rank_problem()
    a = torch.as_tensor(problem.matrix)
    g = _rows(7)
    arnoldi = ik.Arnoldi(damping=0.5, rank=3, n_iter=7, complement="damping")
    arnoldi.fit(problem.curvature)
    expected = torch.linalg.solve(a + 0.5 * torch.eye(7, dtype=torch.float64), g.T).T
    torch.testing.assert_close(arnoldi.solve(g), expected, rtol=1e-9, atol=1e-12)
    assert arnoldi.fit_info_["spectrum_kept"] == pytest.approx(1.0, rel=1e-9)


def test_lissa_deterministic_reaches_damped_inverse(mlp):
    curvature, dense = mlp
    p = dense.shape[0]
    damping = 0.1
    values = torch.linalg.eigvalsh(dense)
    scale = 1.1 * float(values[-1] + damping)
    rate = 1 - float(values[0] + damping) / scale
    depth = math.ceil(math.log(1e-11) / math.log(rate))
    g = _rows(p)
    lissa = ik.LiSSA(damping=damping, scale=scale, n_iter=depth).fit(curvature)
    expected = torch.linalg.solve(dense + damping * torch.eye(p, dtype=torch.float64), g.T).T
    assert _rel(lissa.solve(g), expected) < 1e-9
    # the scale is only a step size: a larger one reaches the same point with more steps
    lissa2 = ik.LiSSA(damping=damping, scale=2 * scale, n_iter=2 * depth).fit(curvature)
    assert _rel(lissa2.solve(g), expected) < 1e-9


def test_lissa_stochastic_mean_approaches_fixed_point(mlp):
    """Minibatch products: the answer is random but centred near (C + λI)⁻¹ g."""
    curvature, dense = mlp
    p = dense.shape[0]
    damping = 0.1
    values = torch.linalg.eigvalsh(dense)
    g = _rows(p, k=1)
    expected = torch.linalg.solve(dense + damping * torch.eye(p, dtype=torch.float64), g.T).T
    scale = 3 * float(values[-1] + damping)
    lissa = ik.LiSSA(damping=damping, scale=scale, n_iter=150, repeats=8, minibatch_size=10)
    out = lissa.fit(curvature).solve(g)
    assert not lissa.deterministic
    assert _rel(out, expected) < 0.05  # observed 0.005 (seeded)


def test_diagonal_equals_exact_on_diagonal_curvature():
    problem = diagonal_problem()
    g = _rows(4)
    exact = ik.Exact(damping=DAMPING).fit(problem.curvature).solve(g)
    diag = ik.Diagonal(damping=DAMPING).fit(problem.curvature)
    assert diag.fit_info_["estimator"] == "dense"
    torch.testing.assert_close(diag.solve(g), exact, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["empirical_fisher", "fisher"])
def test_diagonal_from_gradients_is_exact_diagonal(kind):
    curvature = _mlp_curvature(kind, regularizer=ik.L2Regularizer(0.05))
    diag = ik.Diagonal(damping=DAMPING, estimator="gradients").fit(curvature)
    torch.testing.assert_close(diag.diagonal_, torch.diagonal(curvature.dense()),
                               rtol=1e-10, atol=1e-13)


def test_diagonal_gradients_with_custom_regularizer():
    def reg(params):  # a non-L2 regulariser: diag(∇²R) = 12 θ² · 0.01 per entry
        return 0.01 * sum((t**4).sum() for t in params.values())
    curvature = _mlp_curvature("empirical_fisher", regularizer=reg)
    diag = ik.Diagonal(estimator="gradients", damping=DAMPING).fit(curvature)
    torch.testing.assert_close(diag.diagonal_, torch.diagonal(curvature.dense()),
                               rtol=1e-10, atol=1e-13)


def test_block_exact_equals_exact_when_curvature_is_block_diagonal():
    problem = blocks_problem()
    g = _rows(7)
    exact = ik.Exact(damping=DAMPING).fit(problem.curvature).solve(g)
    block = ik.block_diagonal({"head1": ik.Exact(damping=DAMPING),
                               "head2": ik.Exact(damping=DAMPING)}).fit(problem.curvature)
    torch.testing.assert_close(block.solve(g), exact, rtol=1e-10, atol=1e-12)


def test_block_exact_equals_blockwise_dense_solve_in_general():
    regularizer = ik.L2Regularizer(0.05)
    curvature = _mlp_curvature("ggn", regularizer=regularizer)
    dense = curvature.dense()
    space = curvature.target.space
    block = ik.block_diagonal(default=ik.Exact(damping=DAMPING)).fit(curvature)
    assert [b["names"] for b in block.fit_info_["blocks"]] == [["0.weight", "0.bias"],
                                                                ["2.weight", "2.bias"]]
    g = _rows(space.numel)
    expected = torch.zeros_like(g)
    for names in (["0.weight", "0.bias"], ["2.weight", "2.bias"]):
        idx = torch.cat([torch.arange(space.slices()[n].start, space.slices()[n].stop)
                         for n in names])
        sub = dense[idx][:, idx] + DAMPING * torch.eye(len(idx), dtype=torch.float64)
        expected[:, idx] = torch.linalg.solve(sub, g[:, idx].T).T
    torch.testing.assert_close(block.solve(g), expected, rtol=1e-10, atol=1e-12)
    # and it is NOT the full inverse here (the layers are coupled)
    full = ik.Exact(damping=DAMPING).fit(curvature).solve(g)
    assert _rel(block.solve(g), full) > 1e-3


def test_block_groups_errors():
    curvature = blocks_problem().curvature
    with pytest.raises(ValueError, match="in no block_diagonal group"):
        ik.block_diagonal({"head1": ik.Exact()}).fit(curvature)
    with pytest.raises(ValueError, match="two block_diagonal groups"):
        ik.block_diagonal({"head1": ik.Exact(), "": ik.Exact()}).fit(curvature)
    with pytest.raises(ValueError, match="matches no parameter"):
        ik.block_diagonal({"head3": ik.Exact()}, default=ik.Exact()).fit(curvature)


def test_block_does_not_fit_the_users_method_in_place():
    method = ik.Exact(damping=DAMPING)
    ik.block_diagonal(default=method).fit(blocks_problem().curvature)
    assert not method.is_fitted


def test_lissa_divergence_raises_with_advice(mlp):
    curvature, dense = mlp
    top = float(torch.linalg.eigvalsh(dense)[-1])
    lissa = ik.LiSSA(damping=DAMPING, scale=top / 4, n_iter=200).fit(curvature)
    with pytest.raises(ConvergenceError, match="increase scale") as info:
        lissa.solve(_rows(dense.shape[0]))
    # the suggested scale is above the largest eigenvalue, so following the advice converges
    suggested = float(str(info.value).split("LiSSA(scale=")[1].split(",")[0])
    assert suggested > top + DAMPING


def test_cg_not_converged_is_reported(mlp):
    curvature, dense = mlp
    p = dense.shape[0]
    g = _rows(p)
    cg = ik.CG(damping=1e-4, max_iter=2, tol=1e-10).fit(curvature)
    with pytest.warns(UserWarning, match="CG did not reach tol"):
        x = cg.solve(g)
    a = dense + 1e-4 * torch.eye(p, dtype=torch.float64)
    true = (x @ a - g).norm(dim=1) / g.norm(dim=1)
    torch.testing.assert_close(cg.last_residuals_, true, rtol=1e-8, atol=1e-14)
    assert bool((cg.last_residuals_ > 1e-10).all())
    strict = ik.CG(damping=1e-4, max_iter=2, tol=1e-10, on_failure="raise").fit(curvature)
    with pytest.raises(ConvergenceError, match="increase max_iter|Increase max_iter"):
        strict.solve(g)


def test_cg_indefinite_hessian_raises():
    torch.manual_seed(0)
    model = nn.Linear(2, 1, bias=False).to(torch.float64)

    def reg(params):  # R = ½ wᵀ diag(0, -3) w makes the Hessian indefinite
        w = params["weight"][0]
        return -1.5 * w[1] ** 2
    target = ik.Target(model, ik.RegressionTask(), regularizer=reg)
    x = torch.eye(2, dtype=torch.float64)  # data Hessian (2/n) Σ x xᵀ = I
    curvature = ik.Curvature(target, (x, torch.zeros(2, 1, dtype=torch.float64)), "hessian")
    np.testing.assert_allclose(curvature.dense().numpy(), np.diag([1.0, -2.0]), atol=1e-12)
    with pytest.raises(ConvergenceError, match="not positive definite"):
        ik.CG(damping=0.0).fit(curvature).solve(torch.ones(2, dtype=torch.float64))


def test_identity_is_plain_dot_product_without_damping(mlp):
    curvature, dense = mlp
    g = _rows(dense.shape[0])
    torch.testing.assert_close(ik.Identity().fit(curvature).solve(g), g)
    torch.testing.assert_close(ik.Identity(damping=4.0).fit(curvature).solve(g), g / 4)


def test_lazy_methods_store_no_tensors_and_need_attach(mlp, tmp_path):
    curvature, dense = mlp
    cg = ik.CG(damping=DAMPING).fit(curvature)
    assert cg.state_dict() == {}
    save_inverse(tmp_path / "cg", cg)
    loaded = load_inverse(tmp_path / "cg", curvature.target)
    with pytest.raises(ik.errors.NotFittedError, match="attach"):
        loaded.solve(_rows(dense.shape[0]))
    other = _mlp_curvature("fisher")
    with pytest.raises(ik.errors.StoreError, match="same kind"):
        loaded.attach(other)


def test_diagonal_hutchinson_is_unbiased(mlp):
    """Each entry of the estimate lies within 5 standard errors of diag(C) (Rademacher probes:
    Var z_i (Cz)_i = Σ_{j≠i} C_ij²)."""
    curvature, dense = mlp
    probes = 64
    diag = ik.Diagonal(damping=DAMPING, estimator="hutchinson", probes=probes).fit(curvature)
    off = dense - torch.diag(torch.diagonal(dense))
    std_error = ((off**2).sum(dim=1) / probes).sqrt()
    assert bool(((diag.diagonal_ - torch.diagonal(dense)).abs() <= 5 * std_error + 1e-12).all())
    assert diag.fit_info_["estimator"] == "hutchinson"


def test_influence_scores_agree_across_methods(mlp):
    """Through the scorer: CG, full-rank Arnoldi and LiSSA give Exact's pairwise scores."""
    curvature, dense = mlp
    target, (x, y) = curvature.target, curvature.data
    query, train = (x[:4], y[:4]), (x, y)
    damping = 0.1
    exact = ik.Influence(target, ik.Exact(damping=damping).fit(curvature)).pairwise(query, train)
    p = dense.shape[0]
    top = float(torch.linalg.eigvalsh(dense)[-1])
    others = [ik.CG(damping=damping, tol=1e-12, max_iter=4 * p),
              ik.Arnoldi(damping=damping, rank=p, n_iter=p),
              ik.LiSSA(damping=damping, scale=1.1 * (top + damping), n_iter=200)]
    for method in others:
        scores = ik.Influence(target, method.fit(curvature)).pairwise(query, train)
        assert scores.shape == (4, 20)
        assert _rel(scores, exact) < 1e-6, type(method).__name__


def test_lissa_minibatches_from_a_dataloader_match_tensor_data(mlp):
    """The same seed draws the same minibatches whether the data is tensors or a DataLoader."""
    curvature, dense = mlp
    x, y = curvature.data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    from_loader = ik.Curvature(curvature.target, loader, kind="ggn")
    g = _rows(dense.shape[0], k=2)
    settings = dict(damping=0.1, scale=2.0, n_iter=20, minibatch_size=8, seed=5)
    a = ik.LiSSA(**settings).fit(curvature).solve(g)
    b = ik.LiSSA(**settings).fit(from_loader).solve(g)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_diagonal_auto_avoids_dense_when_over_budget():
    curvature = _mlp_curvature("fisher")
    small = ik.Runtime(max_dense_bytes=1000)
    diag = ik.Diagonal(damping=DAMPING).fit(curvature, small)
    assert diag.fit_info_["estimator"] == "gradients"
    torch.testing.assert_close(diag.diagonal_, torch.diagonal(curvature.dense()),
                               rtol=1e-10, atol=1e-13)
    ggn = ik.Diagonal(damping=1.0, probes=8).fit(_mlp_curvature("ggn"), small)
    assert ggn.fit_info_["estimator"] == "hutchinson"
    with pytest.raises(ValueError, match="Fisher only"):
        ik.Diagonal(estimator="gradients").fit(_mlp_curvature("ggn"))
