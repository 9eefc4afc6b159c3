"""Fit stores and sharded statistics in one process: a stored fit equals a plain fit, is reused
when only the damping changes, and refuses another model, data, label mode or chunking (naming
the key); sampled labels do not depend on how the data are cut; the example count guards
against processes given other data. (Processes under torchrun: test_distributed.py; SIGKILL
and resume: test_kill_resume.py.)"""

import pytest
import torch

import influencekit as ik
from influencekit.curvature.statistics import accumulate
from influencekit.distributed import DistContext
from influencekit.errors import DistributedError, InfluenceKitError, StoreError
from influencekit.storage import FitStore, ResultsArray
from influencekit.testing import workers

RUNTIME = ik.Runtime(batch_size=10, progress=False)


@pytest.fixture(scope="module")
def problem():
    target, train = workers.fit_problem(n_train=60)
    return target, train, ik.Curvature(target, train, kind="ggn")


@pytest.mark.parametrize("method", [ik.KFAC, ik.EKFAC, ik.Exact])
def test_a_stored_fit_equals_a_plain_fit_and_is_reused(tmp_path, problem, method,
                                                        monkeypatch):
    target, train, curvature = problem
    if method is ik.Exact:  # a dense [p, p] curvature: the last layer only (p = 100)
        last = ik.Target(target.model, target.task, params=["4.weight", "4.bias"],
                         regularizer=target.regularizer)
        curvature = ik.Curvature(last, train, kind="ggn")
    plain = method(damping=1e-2).fit(curvature, RUNTIME)
    store = FitStore(tmp_path, chunk_size=20)  # 3 chunks of 2 batches
    stored = method(damping=1e-2).fit(curvature, RUNTIME, store=store)
    torch.testing.assert_close(stored.matrix(), plain.matrix(), rtol=1e-12, atol=1e-15)
    passes = {"Exact": ["dense"], "KFAC": ["factors"], "EKFAC": ["factors", "corrections"]}
    for name in passes[method.__name__]:
        array = ResultsArray.read(tmp_path / name)
        assert array.shape[0] == 3 and array.complete
        # a row: the chunk's sums, then its Σw and its number of examples
        assert [tuple(r) for r in array.values()[:, -2:]] == [(20.0, 20.0)] * 3
    # another damping needs the same statistics: read back, not recomputed, same bits
    other = method(damping=1e-1).fit(curvature, RUNTIME, store=FitStore(tmp_path / "new", 20))

    def no_pass(*args, **kwargs):
        raise AssertionError("the stored statistics were computed again")
    monkeypatch.setattr(ik.Curvature, "batches", no_pass)
    again = method(damping=1e-1).fit(curvature, RUNTIME, store=tmp_path,
                                     stationarity=False)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 other.state_dict().values(), strict=True))


def test_a_store_of_another_fit_is_refused_naming_what_differs(tmp_path, problem):
    target, train, curvature = problem
    ik.EKFAC(damping=1e-2).fit(curvature, RUNTIME, store=FitStore(tmp_path, chunk_size=20))
    other_model, _ = workers.fit_problem(n_train=60, seed=1)
    cases = [
        (ik.Curvature(other_model, train), {}, "model_fingerprint"),
        (ik.Curvature(target, (train[0], train[1].flip(0))), {}, "data_fingerprint"),
        (ik.Curvature(target, train, kind="empirical_fisher"), {}, "kind"),
        (ik.Curvature(target, train, weights=torch.rand(60, dtype=torch.float64)), {},
         "weights"),
        (curvature, {"labels": "sampled"}, "labels"),
    ]
    for changed, settings, key in cases:
        with pytest.raises(StoreError, match=f"config in its meta.json differs \\({key}"):
            ik.EKFAC(damping=1e-2, **settings).fit(changed, RUNTIME, store=tmp_path)
    with pytest.raises(StoreError, match="batch_size: stored 10, this run 12"):
        ik.KFAC(damping=1e-2).fit(curvature, RUNTIME.replace(batch_size=12), store=tmp_path)
    with pytest.raises(StoreError, match="shape"):  # other chunking: another number of rows
        ik.KFAC(damping=1e-2).fit(curvature, RUNTIME, store=FitStore(tmp_path, chunk_size=30))
    with pytest.raises(InfluenceKitError, match="CG keeps no statistics"):
        ik.CG(damping=1e-2).fit(curvature, RUNTIME, store=tmp_path)
    with pytest.raises(StoreError, match="must be a folder or an ik.storage.FitStore"):
        ik.KFAC(damping=1e-2).fit(curvature, RUNTIME, store=3)


def test_sampled_labels_do_not_depend_on_the_chunks(tmp_path, problem):
    """Draws are seeded by the batch's position: one pass, chunks of one batch and a resumed
    store all see the same labels (so the same factors, to rounding)."""
    _, _, curvature = problem
    fits = [ik.KFAC(damping=1e-2, labels="sampled", seed=4).fit(curvature, RUNTIME, store=s)
            for s in (None, FitStore(tmp_path, chunk_size=10))]
    torch.testing.assert_close(fits[1].matrix(), fits[0].matrix(), rtol=1e-12, atol=1e-15)
    reseeded = ik.KFAC(damping=1e-2, labels="sampled", seed=5).fit(curvature, RUNTIME)
    assert (reseeded.matrix() - fits[0].matrix()).abs().max() > 1e-6  # the seed matters


def test_the_chunking_on_disk_is_kept_when_none_is_given(tmp_path, problem):
    _, _, curvature = problem
    ik.KFAC(damping=1e-2).fit(curvature, RUNTIME, store=tmp_path / "default")
    assert ResultsArray.read(tmp_path / "default" / "factors").shape[0] == 6  # a batch each
    first = ik.KFAC(damping=1e-2).fit(curvature, RUNTIME, store=FitStore(tmp_path, 30))
    again = ik.KFAC(damping=1e-2).fit(curvature, RUNTIME, store=tmp_path)  # 2 chunks, not 6
    assert ResultsArray.read(tmp_path / "factors").shape[0] == 2
    assert torch.equal(again.matrix(), first.matrix())


class _OneOfTwo(DistContext):
    """Rank 0 of two processes whose collectives do nothing: as if the other process had
    been given no data."""

    def __init__(self):
        super().__init__(rank=0, world_size=2)

    def all_reduce_sum_(self, tensors):
        return tensors

    def barrier(self):
        pass

    def sum(self, value):
        return value


def test_processes_that_cover_other_data_are_refused(problem):
    _, _, curvature = problem
    runtime = RUNTIME.replace(context=_OneOfTwo())

    def add(rows, sums):
        sums["count"] += len(rows)
        return float(len(rows))

    with pytest.raises(DistributedError, match="covered 30 training examples, but the data "
                                               "hold 60"):
        accumulate(curvature, runtime, lambda: {"count": torch.zeros(1)}, add)
    one = accumulate(curvature, RUNTIME, lambda: {"count": torch.zeros(1)}, add)
    assert (one.examples, one.weight, float(one.values["count"])) == (60, 60.0, 60.0)


def test_a_single_process_context_changes_nothing(problem):
    _, _, curvature = problem
    plain = ik.EKFAC(damping=1e-2).fit(curvature, RUNTIME)
    with_context = ik.EKFAC(damping=1e-2).fit(curvature, RUNTIME.replace(context=DistContext()))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 with_context.state_dict().values(),
                                                 strict=True))
    assert plain.fit_info_["n_examples"] == 60
