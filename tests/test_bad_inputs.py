"""Every bad input of issue 13 gets its own error class, naming the example, the problem and the
fix (the catalogue in influencekit.testing.bad_inputs, one test each); every path that takes a
loader refuses one that reorders; loaders that keep the order score like tensors; batch-norm
running statistics are never updated; a NaN made by the model is named by every inverse and
curvature kind; a Task that reduces over the batch gets the shape error from every engine; an
inverse reused knowingly on another model gives the scores of that metric."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
)

import influencekit as ik
from influencekit.errors import (
    LoaderOrderError,
    ModelMismatchError,
    NonFiniteError,
    TaskOutputShapeError,
    TrainingModeError,
)
from influencekit.testing import bad_inputs

F64 = torch.float64
CASES = bad_inputs.cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_its_error(case):
    outcome = bad_inputs.try_case(case)
    assert outcome.raised == case.error.__name__, outcome.message
    assert not outcome.missing, (outcome.missing, outcome.message)
    if case.index is not None:
        assert outcome.index == case.index
    assert issubclass(case.error, ik.errors.InfluenceKitError)


def test_catalogue_covers_every_group_of_the_issue():
    groups = {c.group for c in CASES}
    assert groups == {"loader order", "layout", "labels", "inputs", "model mode", "non-finite",
                      "task", "model mismatch", "indices"}
    assert len({c.name for c in CASES}) == len(CASES)


# -- loaders ------------------------------------------------------------------------------------
def _problem():
    x, y = bad_inputs._data()
    target = ik.Target(bad_inputs._mlp(), ik.ClassificationTask())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, (x, y)))
    return target, inverse, (x, y)


def _reorders(data):
    return DataLoader(TensorDataset(*data), batch_size=4,
                      sampler=SubsetRandomSampler(range(len(data[1]))))


ENTRY_POINTS = {
    "grads.gradients": lambda t, i, d, bad: ik.grads.gradients(t, bad),
    "Curvature.dense": lambda t, i, d, bad: ik.Curvature(t, bad).dense(),
    "Curvature.matvec": lambda t, i, d, bad: ik.Curvature(t, bad).matvec(
        torch.ones(t.num_params, dtype=F64)),
    "EKFAC.fit": lambda t, i, d, bad: ik.EKFAC(damping=1e-3).fit(ik.Curvature(t, bad)),
    "Influence.pairwise (train)": lambda t, i, d, bad: ik.Influence(t, i).pairwise(d, bad),
    "Influence.pairwise (query)": lambda t, i, d, bad: ik.Influence(t, i).pairwise(bad, d),
    "Influence.self_influence": lambda t, i, d, bad: ik.Influence(t, i).self_influence(bad),
    "stream_scores (train)": lambda t, i, d, bad: ik.stream_scores(ik.Influence(t, i), d, bad,
                                                                   k=2),
    "stream_scores (query)": lambda t, i, d, bad: ik.stream_scores(ik.Influence(t, i), bad, d,
                                                                   k=2),
    "TracIn": lambda t, i, d, bad: ik.TracIn(t, [t.flat_params()]).pairwise(d, bad),
    "TRAK": lambda t, i, d, bad: ik.TRAK(t).pairwise(d, bad),
    "diagnostics.stationarity": lambda t, i, d, bad: ik.diagnostics.stationarity(t, bad),
    "minimize": lambda t, i, d, bad: ik.minimize(t, bad),
    "leave_one_out": lambda t, i, d, bad: ik.response.leave_one_out_retrained(
        t, bad, [0], d, ik.response.LBFGSRetrainer()),
    "grads.take": lambda t, i, d, bad: ik.grads.take(bad, [0, 1]),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_path_that_takes_a_loader_refuses_one_that_reorders(entry):
    target, inverse, data = _problem()
    with pytest.raises(LoaderOrderError, match="SubsetRandomSampler"):
        ENTRY_POINTS[entry](target, inverse, data, _reorders(data))


def test_loaders_that_keep_the_order_score_like_tensors():
    target, inverse, (x, y) = _problem()
    reference = ik.Influence(target, inverse).pairwise((x[:3], y[:3]), (x, y))
    dataset = TensorDataset(x, y)
    loaders = [
        DataLoader(dataset, batch_size=4, drop_last=True),  # 12 = 3 x 4: nothing dropped
        DataLoader(dataset, batch_sampler=BatchSampler(SequentialSampler(dataset), 5, False)),
        DataLoader(dataset, batch_size=5, collate_fn=lambda rows: tuple(
            torch.stack(t) for t in zip(*rows, strict=True))),
    ]
    for loader in loaders:
        scores = ik.Influence(target, inverse).pairwise((x[:3], y[:3]), loader)
        torch.testing.assert_close(scores, reference, rtol=0, atol=1e-12)


# -- model mode ---------------------------------------------------------------------------------
def _bn_model():
    return bad_inputs._mlp(nn.BatchNorm1d(5), nn.Dropout(0.2))


def _running(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def test_batch_norm_statistics_are_never_updated():
    x, y = bad_inputs._data()
    model = _bn_model()
    model[1].running_mean.fill_(0.3)  # as after training: not the initial values
    before = _running(model)
    target = ik.Target(model, ik.ClassificationTask())
    # eval mode: influence runs, the statistics are used, not changed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, (x, y), kind="fisher"))
    ik.Influence(target, inverse).pairwise((x, y), (x, y))
    ik.diagnostics.stationarity(target, (x, y))
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    # train mode: refused before any forward pass ...
    model.train()
    with pytest.raises(TrainingModeError, match=r"'1' \(BatchNorm1d\), '2' \(Dropout, p=0.2\)"):
        ik.grads.gradients(target, (x, y))
    # ... and the training loop, which runs the model in the mode it is in, works on copies
    ik.response.train(target, (x, y), ik.response.batch_schedule(12, batch_size=4, steps=3))
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    assert model.training  # the mode is never switched by influencekit


def test_eval_mode_batch_norm_gradients_match_a_plain_loop():
    """In eval mode batch norm is a fixed affine map per feature, so per-example gradients are
    those of each example alone (checked against autograd one example at a time)."""
    x, y = bad_inputs._data()
    model = _bn_model()
    model[1].running_var.fill_(2.0)
    target = ik.Target(model, ik.ClassificationTask())
    grads = ik.grads.gradients(target, (x, y))
    for i in (0, 5, 11):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(grads[i], expected, rtol=1e-12, atol=1e-12)


# -- non-finite values --------------------------------------------------------------------------
INVERSES = {
    "Exact": lambda: ik.Exact(damping=1e-3),
    "KFAC": lambda: ik.KFAC(damping=1e-3),
    "EKFAC": lambda: ik.EKFAC(damping=1e-3),
    "CG": lambda: ik.CG(damping=1e-3),
    "LiSSA": lambda: ik.LiSSA(damping=1e-3, scale=50.0, n_iter=5),
    "Arnoldi": lambda: ik.Arnoldi(damping=1e-3, rank=4, n_iter=8),
    "Diagonal": lambda: ik.Diagonal(damping=1e-3),
}


@pytest.mark.parametrize("kind", ["ggn", "hessian", "fisher", "empirical_fisher"])
@pytest.mark.parametrize("method", INVERSES)
def test_a_nan_made_by_the_model_is_named_by_every_inverse(method, kind):
    if method in ("KFAC", "EKFAC") and kind == "hessian":
        pytest.skip("K-FAC approximates a Gauss-Newton / Fisher curvature")
    target, train = bad_inputs._sqrt_problem()
    x, y = train
    with pytest.raises(NonFiniteError, match="example 7") as info:
        inverse = INVERSES[method]().fit(ik.Curvature(target, train, kind=kind),
                                         stationarity=False)
        ik.Influence(target, inverse).pairwise((x[:2], y[:2]), (x[:2], y[:2]))
    assert info.value.index == 7


@pytest.mark.parametrize("engine", ["hooks", "vmap", "loop"])
def test_a_task_reduced_over_the_batch_gets_the_shape_error_from_every_engine(engine):
    """Also without the data layer's probe: the engine itself checks the shape."""
    x, y = bad_inputs._data()
    target = ik.Target(bad_inputs._mlp(), bad_inputs._reduced_task())
    gradient_engine = ik.grads.GradientEngine(target, engine)
    with pytest.raises(TaskOutputShapeError, match=r"MeanLoss.loss returned shape \(\).*"
                                                   r"reduction='none'"):
        gradient_engine(target.params(), (x, y))


# -- model mismatch -----------------------------------------------------------------------------
def test_an_inverse_reused_knowingly_scores_in_its_own_metric():
    """allow_other_model=True: s = g_q(B)ᵀ (C_A + λI)⁻¹ g_m(B) with C_A of the fitted model A
    and the gradients of the model B it is used with (checked with dense linear algebra)."""
    x, y = bad_inputs._data()
    a = ik.Target(bad_inputs._mlp(seed=0), ik.ClassificationTask())
    b = ik.Target(bad_inputs._mlp(seed=1), ik.ClassificationTask())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inverse = ik.Exact(damping=1e-2).fit(ik.Curvature(a, (x, y)))
    with pytest.raises(ModelMismatchError):
        ik.Influence(b, inverse).pairwise((x, y), (x, y))
    scores = ik.Influence(b, inverse, allow_other_model=True).pairwise((x[:3], y[:3]), (x, y))
    c_a = ik.Curvature(a, (x, y)).dense()
    g_q = ik.grads.gradients(b, (x[:3], y[:3]), of="measurement")
    g_m = ik.grads.gradients(b, (x, y))
    expected = g_q @ torch.linalg.solve(c_a + 1e-2 * torch.eye(len(c_a), dtype=F64), g_m.T)
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)
