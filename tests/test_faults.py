"""Fault injection: subset retraining into a results store and streaming scores into a score
store, SIGKILLed at random points and resumed; two processes writing disjoint partitions (or
ranks) of one store at once; two partial score stores written at once, then merged. The final
array must be bit-identical to an uninterrupted run, with no row or block lost.

The default suite forks its workers from a :class:`Zygote` (imports paid once); the slow tests
also start each worker as a fresh interpreter."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from influencekit.errors import StoreError
from influencekit.storage import ResultsArray, ScoreStore, merge_score_stores
from influencekit.testing import workers
from influencekit.testing.faults import (
    RowLedger,
    kill_and_resume,
    run_concurrently,
    run_once,
)

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


@pytest.fixture(scope="module")
def uninterrupted(zygote, tmp_path_factory):
    """``get(n_subsets) -> (values, seconds)``: one uninterrupted worker run into its own store,
    the array every interrupted run must reproduce bit for bit, and how long it took."""
    cache = {}

    def get(n_subsets):
        if n_subsets not in cache:
            store = tmp_path_factory.mktemp("uninterrupted") / "store"
            run = run_once(workers.command("subset_retraining", store, "--subsets", n_subsets),
                           env=ENV, launcher=zygote)
            assert run.returncode == 0, run.output
            array = ResultsArray.read(store)
            assert array.complete
            cache[n_subsets] = array.values(), run.seconds
        return cache[n_subsets]
    return get


def test_uninterrupted_worker_matches_an_in_process_run(uninterrupted):
    """The reference itself: the worker's rows are those of subset_retraining without a store
    (the meaning of the rows is tested against closed-form ridge in test_truth_response.py)."""
    values, _ = uninterrupted(4)
    np.testing.assert_allclose(values, workers.subset_retraining(None, n_subsets=4),
                               rtol=1e-12, atol=0)


def _reader(store):
    def read():
        if not (store / "meta.json").exists():
            return None
        array = ResultsArray.read(store)
        return array.done(), array.values()
    return read


def _assert_final(store, reference):
    array = ResultsArray.read(store)
    assert array.complete
    final = array.values()
    assert final.tobytes() == reference.tobytes()  # bit-identical
    assert sorted(p.name for p in store.iterdir()) == ["checksums.npy", "meta.json",
                                                       "values.npy"]


def _kill_campaign(tmp_path, seed, kills, n_subsets, launcher, uninterrupted):
    reference, seconds = uninterrupted(n_subsets)
    store = tmp_path / f"store{seed}"
    ledger = RowLedger(_reader(store), reference)
    report = kill_and_resume(workers.command("subset_retraining", store, "--subsets", n_subsets),
                             kills=kills, seed=seed, progress=lambda: ResultsArray.rows_done(store),
                             total=n_subsets, unit_seconds=seconds / n_subsets, env=ENV,
                             after_each=ledger, launcher=launcher)
    assert report.completed, report.runs[-1].output
    assert all(r.returncode == -signal.SIGKILL for r in report.runs if r.killed)
    assert ledger.clean, (ledger.lost, ledger.wrong, ledger.unreadable)
    _assert_final(store, reference)
    return report, ledger


def test_killed_runs_resume_bit_identical(tmp_path, zygote, uninterrupted):
    report, ledger = _kill_campaign(tmp_path, seed=0, kills=3, n_subsets=12, launcher=zygote,
                                    uninterrupted=uninterrupted)
    assert report.kills >= 2  # every kill point lies inside the work left (the last row may
    # end before a kill due late in it)
    assert ledger.done_after[-1] == 12


def test_two_partitions_of_one_store_at_once(tmp_path, zygote, uninterrupted):
    """Even and odd rows (interleaved: every page of both files is shared) by two processes
    that are released together, so they also race to create the store."""
    reference, _ = uninterrupted(12)
    store = tmp_path / "store"
    runs = run_concurrently([workers.command("subset_retraining", store, "--rows", which,
                                             "--subsets", 12) for which in ("even", "odd")],
                            env=ENV, launcher=zygote)
    assert [r.returncode for r in runs] == [0, 0], [r.output for r in runs]
    _assert_final(store, reference)


def test_a_worker_that_fails_is_reported(tmp_path, zygote):
    """The harness reports a crash (it does not mistake it for a clean finish)."""
    run = run_once(workers.command("subset_retraining", tmp_path / "s", "--rows", "nope"),
                   env=ENV, launcher=zygote)
    assert run.returncode == 2 and not run.killed and "invalid choice" in run.output
    run = run_once(workers.command("subset_retraining", tmp_path / "s", "--subsets", "0"),
                   env=ENV, launcher=zygote)
    assert run.returncode == 1 and "Traceback" in run.output


def test_row_ledger_counts_a_lost_row():
    """The ledger itself: a row done then not done, and a row changed, are both lost."""
    states = iter([(np.array([True, False]), np.array([1.0, 0.0])),
                   (np.array([False, True]), np.array([1.0, 2.0])),
                   (np.array([False, True]), np.array([1.0, 3.0]))])
    ledger = RowLedger(lambda: next(states))
    ledger(), ledger(), ledger()
    assert ledger.lost == [(1, 0), (2, 1)] and ledger.done_after == [1, 1, 1]


def test_row_ledger_counts_an_unreadable_store():
    def read():
        raise StoreError("corrupt")
    ledger = RowLedger(read)
    ledger()
    assert not ledger.clean and ledger.unreadable == [(0, "StoreError: corrupt")]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_many_kills_resume_bit_identical(tmp_path, seed, zygote, uninterrupted):
    report, _ = _kill_campaign(tmp_path, seed=seed, kills=10, n_subsets=24, launcher=zygote,
                               uninterrupted=uninterrupted)
    assert report.kills >= 8


@pytest.mark.slow
def test_kills_of_fresh_interpreters_resume_bit_identical(tmp_path, uninterrupted):
    """The same without the zygote: each run is a new Python process."""
    report, _ = _kill_campaign(tmp_path, seed=7, kills=3, n_subsets=24, launcher=None,
                               uninterrupted=uninterrupted)
    assert report.completed


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partitions_with_one_writer_killed_then_resumed(tmp_path, seed, zygote, uninterrupted):
    reference, seconds = uninterrupted(24)
    store = tmp_path / "store"
    argvs = [workers.command("subset_retraining", store, "--rows", which, "--subsets", 24)
             for which in ("even", "odd")]
    rng = np.random.default_rng(seed)
    runs = run_concurrently(argvs, kill_after=[float(rng.uniform(0, seconds / 2)), None],
                            env=ENV, launcher=zygote)
    assert runs[1].returncode == 0, runs[1].output
    ledger = RowLedger(_reader(store), reference)
    ledger()
    runs = run_concurrently(argvs, env=ENV, launcher=zygote)
    assert [r.returncode for r in runs] == [0, 0]
    ledger()
    assert ledger.clean
    _assert_final(store, reference)


# -- score stores -------------------------------------------------------------------------------
N_TRAIN = 600  # 100 blocks of 6 (a run of ~0.3 s: kills land inside it)


@pytest.fixture(scope="module")
def score_runs(zygote, tmp_path_factory):
    """``get(n_train) -> (blocks, seconds)``: one uninterrupted stream_scores worker run."""
    cache = {}

    def get(n_train):
        if n_train not in cache:
            store = tmp_path_factory.mktemp("scores") / "store"
            run = run_once(workers.command("stream_scores", store, "--train", n_train),
                           env=ENV, launcher=zygote)
            assert run.returncode == 0, run.output
            done, blocks = workers.score_store_state(store)
            assert done.all()
            cache[n_train] = blocks, run.seconds
        return cache[n_train]
    return get


@pytest.fixture(scope="module")
def score_reference(score_runs):
    """``(blocks, seconds)`` of the default suite's score problem (100 blocks)."""
    return score_runs(N_TRAIN)


def test_uninterrupted_score_worker_matches_pairwise(score_reference):
    """The reference itself: its blocks are Influence.pairwise of the same problem, rounded to
    the store's float32."""
    blocks, _ = score_reference
    influence, train, query = workers.score_problem(N_TRAIN)
    full = influence.pairwise(query, train).to(torch.float32).numpy()
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), full)


def _score_ledger(store, blocks):
    return RowLedger(lambda: workers.score_store_state(store), blocks)


def _assert_scores_final(store, blocks):
    done, final = workers.score_store_state(store)
    assert done.all()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(final, blocks, strict=True))
    assert ScoreStore.load(store).verify() == []
    assert sorted(p.name for p in store.iterdir()) == ["checksums.npy", "manifest.json",
                                                       "scores.npy"]


def _score_kill_campaign(tmp_path, seed, kills, launcher, score_reference, n_train=N_TRAIN):
    blocks, seconds = score_reference
    store = tmp_path / f"scores{seed}"
    ledger = _score_ledger(store, blocks)
    report = kill_and_resume(workers.command("stream_scores", store, "--train", n_train),
                             kills=kills, seed=seed,
                             progress=lambda: ScoreStore.blocks_done(store), total=len(blocks),
                             unit_seconds=seconds / len(blocks), env=ENV, after_each=ledger,
                             launcher=launcher)
    assert report.completed, report.runs[-1].output
    assert ledger.clean, (ledger.lost, ledger.wrong, ledger.unreadable)
    _assert_scores_final(store, blocks)
    return report


def test_killed_score_runs_resume_bit_identical(tmp_path, zygote, score_reference):
    report = _score_kill_campaign(tmp_path, 0, 3, zygote, score_reference)
    assert report.kills >= 2


def test_two_ranks_write_one_score_store_at_once(tmp_path, zygote, score_reference):
    """Two writers of one store (a rank's contiguous share of the blocks each), released
    together so they also race to create it; one is killed at a random point, then both are
    resumed."""
    blocks, seconds = score_reference
    store = tmp_path / "shared"
    argvs = [workers.command("stream_scores", store, "--train", N_TRAIN, "--rank", r,
                             "--ranks", 2) for r in (0, 1)]
    rng = np.random.default_rng(0)
    runs = run_concurrently(argvs, kill_after=[float(rng.uniform(0, seconds / 2)), None],
                            env=ENV, launcher=zygote)
    assert runs[1].returncode == 0, runs[1].output
    ledger = _score_ledger(store, blocks)
    ledger()
    runs = run_concurrently(argvs, env=ENV, launcher=zygote)
    assert [r.returncode for r in runs] == [0, 0], [r.output for r in runs]
    ledger()
    assert ledger.clean, (ledger.lost, ledger.wrong, ledger.unreadable)
    _assert_scores_final(store, blocks)


def test_two_partitions_written_at_once_then_merged(tmp_path, zygote, score_reference):
    blocks, _ = score_reference
    parts = [tmp_path / f"part{i}" for i in (0, 1)]
    runs = run_concurrently([workers.command("stream_scores", part, "--train", N_TRAIN,
                                             "--partition", f"{i}/2")
                             for i, part in enumerate(parts)], env=ENV, launcher=zygote)
    assert [r.returncode for r in runs] == [0, 0], [r.output for r in runs]
    merge_score_stores(parts, tmp_path / "merged")
    _assert_scores_final(tmp_path / "merged", blocks)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_many_kills_of_score_runs_resume_bit_identical(tmp_path, seed, zygote, score_runs):
    """200 blocks; a kill aimed at the last blocks may come after the run ended (the benchmark
    saw 44 of 50 land), so at least 6 of 10 must land."""
    report = _score_kill_campaign(tmp_path, seed, 10, zygote, score_runs(1200), n_train=1200)
    assert report.kills >= 6
