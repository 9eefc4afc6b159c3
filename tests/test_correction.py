"""fix_prediction flips a constructed misprediction, and the influence selector beats random."""

from __future__ import annotations

import copy

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


# -- many queries, precomputed scores, dict queries, a subset of layers -------------------------
def _plain_selection(target, train, query_x, desired, damping):
    """g_qᵀ (C + λI)⁻¹ g_m from a per-example autograd loop and a dense solve (no library
    gradient engine, no inverse object)."""
    params = list(target.model.parameters())

    def grad(loss):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    x, y = train
    reg = grad(target.regularization(dict(target.model.named_parameters())))
    g_m = torch.stack([grad(nn.functional.cross_entropy(target.model(x[i:i + 1]), y[i:i + 1]))
                       for i in range(len(y))]) + reg
    g_q = grad(nn.functional.cross_entropy(target.model(query_x[None]),
                                           torch.tensor([desired])))
    c = ik.Curvature(target, train, kind="ggn").dense()
    return g_m @ torch.linalg.solve(c + damping * torch.eye(c.shape[0], dtype=c.dtype), g_q)


def test_selection_matrix_rows_equal_plain_scores_and_single_query_scores():
    target, train, _, _ = mislabelled_toy()
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, train, kind="ggn"))
    queries = torch.tensor([[2.0, 1.9], [-2.0, 0.3], [0.1, -0.2]], dtype=torch.float64)
    desired = torch.tensor([1, 1, 0])
    query = (queries, torch.zeros(3, dtype=torch.long))  # own labels are ignored
    matrix = ik.correction.selection_matrix(target, inverse, train, query, desired)
    assert matrix.shape == (3, 81)
    for i in range(3):
        plain = _plain_selection(target, train, queries[i], int(desired[i]), 1e-3)
        torch.testing.assert_close(matrix[i], plain, rtol=1e-8, atol=1e-10)
    similarity = ik.correction.selection_matrix(target, None, train, query, desired,
                                                selector="gradient_similarity")
    one = selection_scores(target, None, train, queries[1], 1, "gradient_similarity")
    torch.testing.assert_close(similarity[1], one, rtol=1e-10, atol=1e-12)


def test_precomputed_scores_give_the_same_fix_and_heldout_before_is_reused():
    target, train, heldout, query = mislabelled_toy()
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, train, kind="ggn"))
    kw = dict(k=8, steps=10, lr=0.02, optimizer="adam", heldout=heldout)
    fresh = fix_prediction(target, inverse, train, query, 1, **kw)
    row = ik.correction.selection_matrix(target, inverse, train, (query[None], [0]), [1])[0]
    reused = fix_prediction(target, inverse, train, query, 1, scores=row,
                            heldout_before=fresh.heldout_accuracy_before, **kw)
    assert reused.indices == fresh.indices and reused.steps == fresh.steps
    assert torch.equal(reused.params, fresh.params)
    assert reused.heldout_accuracy_after == fresh.heldout_accuracy_after
    faked = fix_prediction(target, inverse, train, query, 1, scores=row, heldout_before=0.5,
                           **kw)
    assert faked.heldout_accuracy_before == 0.5  # taken as given, not recomputed


def test_fine_tuning_a_subset_of_layers_equals_a_plain_loop():
    """Influence over the whole MLP, fine-tuning only its last Linear: normalised steps of the
    mean loss of the selected examples, checked against a plain autograd loop."""
    target, train, _, query = mislabelled_toy()
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, train, kind="ggn"))
    res = fix_prediction(target, inverse, train, query, 1, k=8, steps=3, lr=0.05,
                         optimizer="normalized", params=["2"])
    assert res.params.numel() == 16 * 2 + 2 and res.steps >= 1
    model = copy.deepcopy(target.model)
    last = list(model[2].parameters())
    x, y = train[0][res.indices], train[1][res.indices]
    for _ in range(res.steps):
        loss = nn.functional.cross_entropy(model(x), y) + target.regularizer(
            {"2.weight": last[0], "2.bias": last[1]})
        grads = torch.autograd.grad(loss, last)
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        with torch.no_grad():
            for p, g in zip(last, grads, strict=True):
                p -= 0.05 * g / norm
    plain = torch.cat([p.detach().reshape(-1) for p in last])
    torch.testing.assert_close(res.params, plain, rtol=1e-10, atol=1e-12)
    # the first layer, not fine-tuned, is untouched in the fixed model
    with torch.no_grad():
        loss_after = nn.functional.cross_entropy(model(query[None]), torch.tensor([1]))
    assert res.query_loss_after == pytest.approx(float(loss_after), rel=1e-10)


def test_bad_correction_inputs_are_refused_with_clear_errors():
    target, train, _, query = mislabelled_toy()
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, train, kind="ggn"))
    err = ik.errors.InfluenceKitError
    with pytest.raises(err, match="2 desired labels for 1 queries"):
        ik.correction.selection_matrix(target, inverse, train, (query[None], [0]), [1, 0])
    with pytest.raises(err, match="ranks no examples"):
        ik.correction.selection_matrix(target, inverse, train, (query[None], [0]), [1],
                                       selector="random")
    with pytest.raises(err, match=r"scores must have shape \[n_train\] = \[81\]"):
        fix_prediction(target, inverse, train, query, 1, scores=torch.zeros(80))
    with pytest.raises(err, match="pass scores=None"):
        fix_prediction(target, inverse, train, query, 1, scores=torch.zeros(81),
                       selector="random")
    with pytest.raises(err, match="is not one of"):
        fix_prediction(target, inverse, train, query, 1, selector="nearest")


def test_selection_matrix_takes_dict_queries_of_a_hugging_face_model():
    from .transformer_models import classification_data, tiny_bert

    model = tiny_bert()
    target = ik.Target(model, ik.SequenceClassificationTask(),
                       params=["bert.encoder.layer.1.output.dense", "classifier"],
                       regularizer=ik.L2Regularizer(1e-2))
    train, query = classification_data(10, seed=7), classification_data(3, seed=8)
    inverse = ik.Exact(damping=1e-2).fit(ik.Curvature(target, train, kind="ggn"))
    desired = (query["labels"] + 1) % 3
    matrix = ik.correction.selection_matrix(target, inverse, train, query, desired)
    # Influence.pairwise (checked against a dense solve in test_transformers) of the queries
    # relabelled with the desired labels, measurement = loss
    relabelled = ik.correction.relabel(target, query, desired)
    assert torch.equal(relabelled["labels"], desired)
    reference = ik.Influence(target, inverse).pairwise(relabelled, train)
    torch.testing.assert_close(matrix, reference, rtol=1e-9, atol=1e-12)
    one = {k: v[2] for k, v in query.items() if k != "labels"}
    row = selection_scores(target, inverse, train, one, int(desired[2]), "influence")
    torch.testing.assert_close(matrix[2], row, rtol=1e-9, atol=1e-12)
