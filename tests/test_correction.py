"""fix_prediction flips a constructed misprediction, and the influence selector beats random."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.correction import fix_prediction, selection_scores


def mislabelled_toy():
    """Two separable blobs (class 0 left, class 1 right) and ONE class-1 point labelled 0 at
    (2, 2); a tanh MLP trained on them predicts 0 for the query next to it."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(40, 2, generator=gen, dtype=torch.float64) * 0.7 + torch.tensor([-2.0, 0])
    x1 = torch.randn(40, 2, generator=gen, dtype=torch.float64) * 0.7 + torch.tensor([2.0, 0])
    bad = torch.tensor([[2.0, 2.0]], dtype=torch.float64)
    x = torch.cat([x0, x1, bad])
    y = torch.cat([torch.zeros(40), torch.ones(40), torch.zeros(1)]).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).to(torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(800):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    reg = ik.L2Regularizer(1e-3)
    target = ik.Target(model, ik.ClassificationTask(), regularizer=reg)
    xh = torch.randn(200, 2, generator=gen, dtype=torch.float64) * 0.7
    yh = (torch.rand(200, generator=gen) < 0.5).long()
    xh = xh + torch.stack([torch.where(yh == 1, 2.0, -2.0), torch.zeros(200)], 1).double()
    query = torch.tensor([2.0, 1.9], dtype=torch.float64)
    return target, (x, y), (xh, yh), query


def test_fix_prediction_flips_mislabelled_region_and_beats_random():
    target, train, heldout, query = mislabelled_toy()
    assert int(target.model(query[None]).argmax()) == 0  # the misprediction
    before = target.flat_params().clone()
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, train, kind="ggn"))

    # the most harmful example for label 1 is the mislabelled point (index 80)
    scores = selection_scores(target, inverse, train, query, 1, "influence")
    assert int(torch.argmin(scores)) == 80

    kw = dict(k=8, steps=10, lr=0.02, optimizer="adam", heldout=heldout)
    infl = fix_prediction(target, inverse, train, query, 1, selector="influence", **kw)
    rand = fix_prediction(target, inverse, train, query, 1, selector="random", **kw)
    assert infl.fixed and infl.prediction_after == 1 and infl.steps <= 10
    assert not rand.fixed and rand.steps == 10
    assert infl.real_loss_change < -3.0 < rand.real_loss_change
    # the reported query loss is the real loss at the returned parameters
    model = target.model
    with torch.no_grad():
        for p, v in zip(model.parameters(), target.space.unflatten(infl.params).values(),
                        strict=True):
            p.copy_(v)
        loss = nn.functional.cross_entropy(model(query[None]), torch.tensor([1]))
        acc = (model(heldout[0]).argmax(1) == heldout[1]).double().mean()
        for p, v in zip(model.parameters(), target.space.unflatten(before).values(),
                        strict=True):
            p.copy_(v)
        acc0 = (model(heldout[0]).argmax(1) == heldout[1]).double().mean()
    assert infl.query_loss_after == pytest.approx(float(loss), rel=1e-10)
    assert infl.heldout_accuracy_after == pytest.approx(float(acc))
    assert infl.heldout_accuracy_before == pytest.approx(float(acc0))
    assert infl.heldout_accuracy_delta >= -0.01  # collateral damage at most one point
    # the user's model was not modified
    assert torch.equal(target.flat_params(), before)


def test_ascending_harmful_examples_and_in_place():
    target, train, heldout, query = mislabelled_toy()
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, train, kind="ggn"))
    res = fix_prediction(target, inverse, train, query, 1, k=5, steps=10, lr=0.02,
                         optimizer="adam", ascend_harmful=True, in_place=True)
    assert res.harmful_indices[0] == 80
    assert res.fixed
    assert torch.equal(target.flat_params(), res.params)  # written only because in_place=True
    assert int(target.model(query[None]).argmax()) == 1
