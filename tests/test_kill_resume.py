"""Stores of the scale stages, written by processes killed with SIGKILL at random points
(repeated), then resumed, end bit-identical to an uninterrupted run:

- a score store (``stream_scores``: scores, done-mask, manifest, top-k);
- a fit store (EK-FAC's factor and eigenvalue-correction statistics chunk by chunk, and the
  fitted inverse), no chunk once written lost or changed;
- a projected gradient store (``build_gradient_store``: float32 rows of LoGra-projected
  per-example gradients), no row once written lost or changed. It has no partitions (a build
  computes every row not yet done), so there is no two-writer test for it.

Both run on the fault harness (:mod:`influencekit.testing.faults`): the workers of
:mod:`influencekit.testing.workers`, forked from a :class:`Zygote` that imported torch once,
each run its own process, killed by pid at a point inside the work (:class:`KillAtProgress`).
"""

import os
import random
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from influencekit.storage import ResultsArray, ScoreStore, load_inverse
from influencekit.testing import workers
from influencekit.testing.faults import RowLedger, kill_and_resume, run_once

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
SCORE_BLOCKS = 200  # 1200 training examples in blocks of 6, one block of queries


# -- score store ------------------------------------------------------------------------------
def _done_blocks(folder) -> int:
    return ScoreStore.blocks_done(folder / "store")


def _score_reader(folder):
    def read():
        if not (folder / "store" / "manifest.json").exists():
            return None
        store = ScoreStore.load(folder / "store", writable=False)
        done = store.done()[0]
        return done, [store.read_block(0, ti).numpy() for ti in range(len(done))]
    return read


def _score_kill_campaign(tmp_path, zygote, seed, kills):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    first = run_once(workers.command("score_store", reference), env=ENV, launcher=zygote)
    assert first.returncode == 0, first.output
    ref_store = ScoreStore.load(reference / "store", writable=False)
    ledger = RowLedger(_score_reader(killed),
                       np.stack([ref_store.read_block(0, t).numpy() for t in range(SCORE_BLOCKS)]))
    # a kill right after the start (during the store's creation or its first blocks) ...
    rng = random.Random(seed)
    early = run_once(workers.command("score_store", killed), kill_after=rng.uniform(0, 0.05),
                     env=ENV, launcher=zygote)
    ledger(early)
    # ... then kills inside the work left, and a last run to the end
    report = kill_and_resume(workers.command("score_store", killed), kills=kills, seed=seed,
                             progress=lambda: _done_blocks(killed), total=SCORE_BLOCKS,
                             unit_seconds=first.seconds / SCORE_BLOCKS, env=ENV,
                             after_each=ledger, launcher=zygote)
    assert report.completed, report.runs[-1].output
    assert all(r.returncode == -signal.SIGKILL for r in report.runs if r.killed)
    assert ledger.clean, (ledger.lost, ledger.wrong, ledger.unreadable)
    progress = ledger.done_after
    assert progress == sorted(progress) and progress[-1] == SCORE_BLOCKS, progress
    stores = [ScoreStore.load(f / "store", writable=False) for f in (reference, killed)]
    assert stores[1].complete and stores[1].verify() == []
    assert stores[1].manifest == stores[0].manifest  # the same run (store ids differ)
    blocks = [np.stack([s.read_block(0, t).numpy() for t in range(SCORE_BLOCKS)]) for s in stores]
    assert blocks[0].dtype == blocks[1].dtype == np.float32
    assert blocks[0].tobytes() == blocks[1].tobytes()
    ref_top, got_top = (load_file(str(f / "top_k.safetensors")) for f in (reference, killed))
    assert all(ref_top[k].numpy().tobytes() == got_top[k].numpy().tobytes() for k in ref_top)
    return report


def test_score_store_killed_at_random_points_resumes_bit_identical(tmp_path, zygote):
    report = _score_kill_campaign(tmp_path, zygote, seed=11, kills=3)
    assert report.kills >= 2


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_score_store_many_kills(tmp_path, zygote, seed):
    report = _score_kill_campaign(tmp_path, zygote, seed=seed, kills=10)
    assert report.kills >= 8


# -- fit store --------------------------------------------------------------------------------
PASSES = ("factors", "corrections")


def _fit_progress(folder):
    return lambda: sum(ResultsArray.rows_done(folder / "fit" / name) for name in PASSES)


def _fit_reader(folder, n_chunks):
    """Rows of both passes, in order (a pass not yet created counts as rows not done)."""
    def read():
        done, values = [], []
        for name in PASSES:
            path = folder / "fit" / name
            if not (path / "meta.json").exists():
                done += [False] * n_chunks
                values += [np.zeros(0)] * n_chunks
                continue
            array = ResultsArray.read(path)
            done += list(array.done())
            values += list(array.values())
        return np.array(done), values
    return read


def _fit_kill_campaign(tmp_path, zygote, seed, kills, n_train, method="EKFAC"):
    n_chunks = n_train // workers.FIT_BATCH  # one batch per chunk
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    args = ("--method", method, "--examples", n_train)
    first = run_once(workers.command("fit_store", reference, *args), env=ENV, launcher=zygote)
    assert first.returncode == 0, first.output
    ref_done, ref_rows = _fit_reader(reference, n_chunks)()
    assert ref_done.all()
    ledger = RowLedger(_fit_reader(killed, n_chunks), np.array(ref_rows, dtype=object))
    report = kill_and_resume(workers.command("fit_store", killed, *args), kills=kills, seed=seed,
                             progress=_fit_progress(killed), total=2 * n_chunks,
                             unit_seconds=first.seconds / (2 * n_chunks), env=ENV,
                             after_each=ledger, launcher=zygote)
    assert report.completed, report.runs[-1].output
    assert all(r.returncode == -signal.SIGKILL for r in report.runs if r.killed)
    assert ledger.clean, (ledger.lost, ledger.wrong, ledger.unreadable)
    assert ledger.done_after == sorted(ledger.done_after), ledger.done_after
    expected = load_inverse(reference / "inverse")
    got = load_inverse(killed / "inverse")
    state, ref_state = got.state_dict(), expected.state_dict()
    assert sorted(state) == sorted(ref_state)
    assert all(state[k].numpy().tobytes() == ref_state[k].numpy().tobytes() for k in state)
    # the uninterrupted store fit is the fit without a store (to rounding: other sums' order)
    plain = workers.fit_inverse(method, n_train)
    torch.testing.assert_close(expected.matrix(), plain.matrix(), rtol=1e-10, atol=1e-13)
    return report, ledger


def test_fit_store_killed_at_random_points_resumes_bit_identical(tmp_path, zygote):
    report, ledger = _fit_kill_campaign(tmp_path, zygote, seed=0, kills=3, n_train=240)
    assert report.kills >= 2
    assert 0 < ledger.done_after[0] < 48  # the first kill landed inside the work


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_fit_store_many_kills(tmp_path, zygote, seed):
    report, _ = _fit_kill_campaign(tmp_path, zygote, seed=seed, kills=10, n_train=600)
    assert report.kills >= 8


@pytest.mark.slow
def test_dense_fit_store_killed_resumes_bit_identical(tmp_path, zygote):
    """The same for an Exact fit (one pass of dense curvature sums)."""
    n_train = 240
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    args = ("--method", "Exact", "--examples", n_train)
    first = run_once(workers.command("fit_store", reference, *args), env=ENV, launcher=zygote)
    assert first.returncode == 0, first.output
    n_chunks = n_train // workers.FIT_BATCH
    report = kill_and_resume(workers.command("fit_store", killed, *args), kills=4, seed=5,
                             progress=lambda: ResultsArray.rows_done(killed / "fit" / "dense"),
                             total=n_chunks, unit_seconds=first.seconds / n_chunks, env=ENV,
                             launcher=zygote)
    assert report.completed and report.kills >= 3
    expected, got = (load_inverse(f / "inverse").state_dict() for f in (reference, killed))
    assert all(got[k].numpy().tobytes() == expected[k].numpy().tobytes() for k in expected)


# -- gradient store ---------------------------------------------------------------------------
def _gradient_reader(store):
    def read():
        if not (store / "gradients" / "meta.json").exists():
            return None
        array = ResultsArray.read(store / "gradients")
        return array.done(), array.values()
    return read


def _gradient_kill_campaign(tmp_path, zygote, seed, kills, n_train):
    """SIGKILL ``build_gradient_store`` at random points (rows land a batch of 10 at a time,
    their records one by one), resume, and compare with an uninterrupted build bit for bit."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    args = ("--examples", n_train)
    first = run_once(workers.command("gradient_store", reference, *args), env=ENV,
                     launcher=zygote)
    assert first.returncode == 0, first.output
    expected = ResultsArray.read(reference / "gradients")
    assert expected.complete
    ledger = RowLedger(_gradient_reader(killed), expected.values())
    report = kill_and_resume(workers.command("gradient_store", killed, *args), kills=kills,
                             seed=seed,
                             progress=lambda: ResultsArray.rows_done(killed / "gradients"),
                             total=n_train, unit_seconds=first.seconds / n_train, env=ENV,
                             after_each=ledger, launcher=zygote)
    assert report.completed, report.runs[-1].output
    assert all(r.returncode == -signal.SIGKILL for r in report.runs if r.killed)
    assert ledger.clean, (ledger.lost, ledger.wrong, ledger.unreadable)
    assert ledger.done_after == sorted(ledger.done_after), ledger.done_after
    got = ResultsArray.read(killed / "gradients")
    assert got.complete and got.meta["config"] == expected.meta["config"]
    assert got.dtype == np.float32
    assert got.values().tobytes() == expected.values().tobytes()
    return report, ledger


def test_gradient_store_killed_at_random_points_resumes_bit_identical(tmp_path, zygote):
    # 1200 examples: a build of ~0.4 s on a quiet machine (at 240 it ended before the kills)
    report, ledger = _gradient_kill_campaign(tmp_path, zygote, seed=0, kills=3, n_train=1200)
    assert report.kills >= 2
    assert 0 < ledger.done_after[0] < 1200  # the first kill landed inside the work
    # the uninterrupted worker's rows are the projected gradients computed without a store
    from influencekit.scoring import iter_projected_gradients

    target, train, projection, runtime = workers.gradient_problem(1200)
    plain = torch.cat([rows for _, rows in iter_projected_gradients(target, train, projection,
                                                                    runtime)])
    stored = ResultsArray.read(tmp_path / "reference" / "gradients").values()
    assert plain.dtype == torch.float64 and plain.shape == stored.shape
    assert np.array_equal(stored, plain.numpy().astype(np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_gradient_store_many_kills(tmp_path, zygote, seed):
    report, _ = _gradient_kill_campaign(tmp_path, zygote, seed=seed, kills=10, n_train=3000)
    assert report.kills >= 8
