"""Property-based tests (hypothesis) of the public data layer (influencekit.grads): for random
shapes, weights, dtypes, batch sizes and containers (tuple, dict, Dataset, DataLoader) the
scores are the same within dtype tolerance; take / collate round trips agree with plain tensor
indexing; positions (and the positions named in errors) do not depend on how data is batched.

Few examples per property (max_examples small, derandomised) so the default suite stays quick.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import influencekit as ik
from influencekit.errors import DataError, LabelError
from influencekit.grads import DictDataset, as_loader, collate, iter_batches, take

FAST = settings(max_examples=10, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=150)
F64 = torch.float64
CONTAINERS = ("tuple", "dict", "TensorDataset", "DictDataset", "DataLoader", "dict DataLoader")


class DictTask(ik.ClassificationTask):
    """Classification reading ``{"x": ..., "y": ...}`` batches."""

    def inputs(self, batch):
        return batch["x"] if isinstance(batch, dict) else batch[0]

    def targets(self, batch):
        return batch["y"] if isinstance(batch, dict) else batch[1]


def _problem(seed, n, d, classes):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randint(0, classes, (n,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 3), nn.Tanh(), nn.Linear(3, classes)).double()
    return ik.Target(model, DictTask()), x, y


def _container(kind, x, y, batch_size):
    if kind == "tuple":
        return (x, y)
    if kind == "dict":
        return {"x": x, "y": y}
    if kind == "TensorDataset":
        return TensorDataset(x, y)
    if kind == "DictDataset":
        return DictDataset({"x": x, "y": y})
    if kind == "DataLoader":
        return DataLoader(TensorDataset(x, y), batch_size=batch_size)
    return DataLoader(DictDataset({"x": x, "y": y}), batch_size=batch_size)


def _fit_and_score(target, train, query, weights, runtime):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inverse = ik.Exact(damping=0.1).fit(ik.Curvature(target, train, weights=weights),
                                            runtime)
    return ik.Influence(target, inverse).pairwise(query, train, runtime)


SCORE_CASES = dict(seed=st.integers(0, 1000), n=st.integers(1, 13), d=st.integers(1, 4),
                   classes=st.integers(2, 4), batch=st.integers(1, 14),
                   train_kind=st.sampled_from(CONTAINERS),
                   query_kind=st.sampled_from(CONTAINERS),
                   dtype=st.sampled_from([torch.float64, torch.float32]),
                   weighted=st.booleans())
ROUND_TRIPS = dict(seed=st.integers(0, 1000), n=st.integers(1, 12), batch=st.integers(1, 5),
                   kind=st.sampled_from(CONTAINERS), data=st.data())


@FAST
@given(**SCORE_CASES)
def test_scores_do_not_depend_on_container_batch_size_or_dtype(**case):
    _check_scores(**case)


@pytest.mark.slow
@SLOW
@given(**SCORE_CASES)
def test_scores_do_not_depend_on_container_batch_size_or_dtype_many(**case):
    _check_scores(**case)


def _check_scores(seed, n, d, classes, batch, train_kind, query_kind, dtype, weighted):
    target, x, y = _problem(seed, n, d, classes)
    weights = (torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.1
               if weighted else None)
    reference = _fit_and_score(target, (x, y), (x[:3], y[:3]), weights,
                               ik.Runtime(batch_size=n, progress=False))
    runtime = ik.Runtime(batch_size=batch, dtype=dtype, progress=False)
    scores = _fit_and_score(target, _container(train_kind, x, y, batch),
                            _container(query_kind, x[:3], y[:3], batch), weights, runtime)
    assert scores.shape == reference.shape == (min(n, 3), n)
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    torch.testing.assert_close(scores.to(F64), reference, rtol=tol,
                               atol=tol * float(reference.abs().max()) + 1e-12)


def _rows(data):
    """Every example of ``data`` in order, as ``(x [n, d], y [n])`` via the data layer."""
    xs, ys = [], []
    for _, batch, _ in iter_batches(as_loader(data, ik.Runtime(batch_size=3, progress=False)),
                                    ik.Runtime(progress=False), None):
        xs.append(batch["x"] if isinstance(batch, dict) else batch[0])
        ys.append(batch["y"] if isinstance(batch, dict) else batch[1])
    return torch.cat(xs), torch.cat(ys)


@FAST
@given(**ROUND_TRIPS)
def test_take_and_collate_round_trip(**case):
    _check_round_trip(**case)


@pytest.mark.slow
@SLOW
@given(**ROUND_TRIPS)
def test_take_and_collate_round_trip_many(**case):
    _check_round_trip(**case)


def _check_round_trip(seed, n, batch, kind, data):
    _, x, y = _problem(seed, n, 2, 3)
    first = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2 * n))
    second = data.draw(st.lists(st.integers(0, len(first) - 1), min_size=1, max_size=6))
    original = _container(kind, x, y, batch)
    taken = take(original, first)
    tx, ty = _rows(taken)
    assert torch.equal(tx, x[first]) and torch.equal(ty, y[first])  # order and repeats kept
    assert type(taken) is type(original) or kind in ("TensorDataset", "DictDataset")
    twice = _rows(take(taken, second))
    assert torch.equal(twice[0], x[first][second]) and torch.equal(twice[1], y[first][second])
    batch_ = collate(original, first)
    cx, cy = (batch_["x"], batch_["y"]) if isinstance(batch_, dict) else batch_[:2]
    assert torch.equal(cx, x[first]) and torch.equal(cy, y[first])
    assert (ik.storage.data_fingerprint(_container("tuple", tx, ty, batch))
            == ik.storage.data_fingerprint((x[first], y[first])))
    with pytest.raises(DataError, match=f"index {n} .* holds {n} examples"):
        take(original, [0, n])


@FAST
@given(n=st.integers(1, 30), batch=st.integers(1, 31), first=st.integers(0, 100))
def test_batch_positions_cover_the_data_once(n, batch, first):
    x = torch.arange(n, dtype=F64)[:, None]
    seen = []
    loader = as_loader((x, x), ik.Runtime(batch_size=batch))
    for start, b, w in iter_batches(loader, ik.Runtime(progress=False), None, first=first,
                                    check=lambda b, s: seen.append((s, len(b[0])))):
        assert torch.equal(b[0][:, 0], torch.arange(start - first, start - first + len(w),
                                                    dtype=F64))
    assert [s for s, _ in seen] == list(range(first, first + n, batch))
    assert sum(size for _, size in seen) == n


@FAST
@given(seed=st.integers(0, 1000), n=st.integers(2, 15), batch=st.integers(1, 16),
       kind=st.sampled_from(CONTAINERS), data=st.data())
def test_the_position_named_by_an_error_does_not_depend_on_batching(seed, n, batch, kind, data):
    target, x, y = _problem(seed, n, 2, 3)
    bad = data.draw(st.integers(0, n - 1))
    label = data.draw(st.sampled_from([-100, -1, 3, 9]))
    y = y.clone()
    y[bad] = label
    with pytest.raises(LabelError, match=f"example {bad} is {label}") as info:
        ik.grads.gradients(target, _container(kind, x, y, batch),
                           ik.Runtime(batch_size=batch, progress=False))
    assert info.value.index == bad


@FAST
@given(n=st.integers(1, 20), data=st.data())
def test_bad_weights_name_their_example(n, data):
    bad = data.draw(st.integers(0, n - 1))
    value = data.draw(st.sampled_from([float("nan"), float("inf"), -0.5]))
    w = np.ones(n)
    w[bad] = value
    with pytest.raises(DataError, match=f"weight of example {bad} is") as info:
        ik.grads.check_weights(torch.tensor(w), n)
    assert info.value.index == bad
