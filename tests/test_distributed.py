"""DistContext and sharded streaming scores: torchrun with 2 and 3 processes (gloo, CPU; uneven
shards) against one process and against independent answers (full gradients, pairwise scores,
a plain eigendecomposition)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import influencekit as ik
from influencekit.distributed import DistContext, Partition, assign_owners, contiguous_range
from influencekit.errors import DistributedError, InfluenceKitError

from .scale_problem import build_problem, sharded_fits

HERE = Path(__file__).parent


# -- pure pieces (no processes) ---------------------------------------------------------------
@pytest.mark.parametrize("n,parts", [(10, 3), (23, 2), (5, 8), (0, 2), (7, 1)])
def test_contiguous_ranges_cover_everything_once(n, parts):
    pieces = [contiguous_range(n, parts, i) for i in range(parts)]
    assert [i for p in pieces for i in p] == list(range(n))
    sizes = [len(p) for p in pieces]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_module_owners_balance_costs_and_agree_across_ranks():
    names = ["a", "b", "c", "d", "e"]
    costs = [1, 8, 2, 2, 1]
    owners = assign_owners(names, 3, costs)
    assert owners == {"b": 0, "c": 1, "d": 2, "a": 1, "e": 2}
    per_rank = [DistContext(rank=r, world_size=3).for_modules(names, costs) for r in range(3)]
    assert sorted(n for names_r in per_rank for n in names_r) == sorted(names)
    assert per_rank[1] == ["a", "c"]  # in the given order


def test_single_process_collectives_are_identities():
    ctx = DistContext()
    t = torch.arange(3.0, dtype=torch.float64)
    assert ctx.all_reduce_sum_(t) is t and torch.equal(t, torch.arange(3.0, dtype=torch.float64))
    assert torch.equal(ctx.all_gather_rows(t[:, None]), t[:, None])
    assert ctx.broadcast(t, 0) is t and ctx.sum(4) == 4
    assert ctx.shard(5) == range(5) and ctx.is_main and not ctx.is_distributed


def test_partition_spec_validation():
    assert Partition.parse("3/8") == Partition(3, 8)
    assert Partition.parse("3/8").range(100) == range(39, 52)
    assert Partition.parse(None).is_whole and str(Partition(2, 5)) == "2/5"
    for bad, words in [("8/8", "outside 0..7"), ("3-8", "'3-8' is not of the form"),
                       ("1/0", "count 0 is not positive"), ("-1/4", "index -1")]:
        with pytest.raises(DistributedError, match=words):
            Partition.parse(bad)
    assert issubclass(DistributedError, InfluenceKitError)


def test_bad_torchrun_environment_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DistributedError, match="WORLD_SIZE='two'"):
        DistContext.from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(DistributedError, match="RANK='5'.*outside 0..1"):
        DistContext.from_env()


# -- torchrun ---------------------------------------------------------------------------------
def _launch(out: Path, nproc: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(HERE / "scale_dist_worker.py"), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(nproc)]


@pytest.fixture(scope="module")
def one_process():
    """The same computations in this process, done directly (no DistContext)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        influence, train, query = build_problem()
        runtime = ik.Runtime(progress=False)
        scores = influence.pairwise(query, train, runtime)
        grads = ik.grads.gradients(influence.target, train, runtime)
    finally:
        torch.set_num_threads(threads)
    slices = influence.target.space.slices()
    eig = {n: torch.linalg.eigvalsh(grads[:, s].T @ grads[:, s]) for n, s in slices.items()}
    return scores, grads, eig


@pytest.fixture(scope="module")
def one_process_fits(tmp_path_factory):
    """The sharded computations of the workers, in this process without a DistContext; and
    the same fits written to fit stores (threads as in the workers: results to the bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runtime = ik.Runtime(batch_size=5, progress=False)
        fits = sharded_fits(runtime)
        stored = sharded_fits(runtime, store=tmp_path_factory.mktemp("fitstore"))
    finally:
        torch.set_num_threads(threads)
    return fits, stored


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_matches_one_process(tmp_path, one_process, one_process_fits, nproc):
    scores, grads, eig = one_process
    ranks = _launch(tmp_path, nproc)
    _check_sharded_fits(ranks, *one_process_fits)
    n_train = grads.shape[0]
    helpful = torch.sort(scores, dim=1, descending=True, stable=True)
    harmful = torch.sort(scores, dim=1, stable=True)
    store = ik.storage.ScoreStore.load(tmp_path / "store")
    assert store.complete
    torch.testing.assert_close(store.scores(), scores, rtol=0, atol=1e-12)
    for r, got in enumerate(ranks):
        assert int(got["world_size"]) == nproc
        assert int(got["refused"]) == 1, r  # another run's store, refused on every rank
        # every rank holds the same merged top-k: the top of the full matrix
        assert torch.equal(got["helpful_indices"], helpful.indices[:, :4]), r
        assert torch.equal(got["harmful_indices"], harmful.indices[:, :4]), r
        torch.testing.assert_close(got["helpful_scores"], helpful.values[:, :4], rtol=0,
                                   atol=1e-12)
        torch.testing.assert_close(got["harmful_scores"], harmful.values[:, :4], rtol=0,
                                   atol=1e-12)
        for key in ("helpful_scores", "harmful_scores", "gathered", "grad_sum"):
            assert torch.equal(got[key], ranks[0][key]), (r, key)
        # reduced example counts and sums equal the one-process values
        assert int(got["count"]) == n_train and int(got["n_train_scored"]) == n_train
        assert int(got["blocks_computed"]) == 5  # 23 examples in blocks of 5, over all ranks
        torch.testing.assert_close(got["grad_sum"], grads.sum(0), rtol=0, atol=1e-12)
        torch.testing.assert_close(got["gathered"], grads, rtol=0, atol=1e-13)
        for name, values in eig.items():
            torch.testing.assert_close(got[f"eig/{name}"], values, rtol=1e-10, atol=1e-12)
        assert torch.equal(got["bf16"], torch.arange(7, dtype=torch.float32).div(3)
                           .to(torch.bfloat16))
    # the per-module eigendecompositions were split: every rank owned at least one
    assert sum(int(g["owned"]) for g in ranks) == len(eig)
    assert all(int(g["owned"]) >= 1 for g in ranks)


def _check_sharded_fits(ranks: list[dict], fits: dict, stored: dict) -> None:
    """K-FAC / EK-FAC factors, eigendecompositions and corrections, dense curvature, products,
    CG, scores and gradients under torchrun equal one process (float64 tolerance); every rank
    holds the same bits; fits through fit stores equal one process's bit for bit."""
    n_train, n_layers = 23, 3
    for r, got in enumerate(ranks):
        for key, expected in fits.items():
            value = got[f"fits/{key}"]
            assert torch.equal(value, ranks[0][f"fits/{key}"]), (r, key)  # same on every rank
            if key.endswith("n_examples"):  # the all-reduced example count
                assert int(value) == n_train, (r, key)
            elif "eigenvectors_" in key:  # defined up to sign: compare |Q|
                torch.testing.assert_close(value.abs(), expected.abs(), rtol=0, atol=1e-9)
            else:
                torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12,
                                           msg=lambda m, key=key: f"{key}: {m}")
        for key, expected in stored.items():  # chunks added in chunk order: the same bits
            assert torch.equal(got[f"stored/{key}"], expected), (r, key)
    # the eigendecompositions (two per layer) were split across the ranks, none done twice
    calls = [int(g["eigh_calls"]) for g in ranks]
    assert sum(calls) == 2 * n_layers and max(calls) < 2 * n_layers, calls
