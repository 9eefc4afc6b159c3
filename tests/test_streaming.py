"""Streaming scores: running top-k against a full sort, score stores against one-shot
``Influence.pairwise``, resume, partitions and their merge, and refusal to mix runs."""

import logging

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.errors import InfluenceKitError, NonFiniteError, StoreError
from influencekit.scoring import RunningTopK, store_top_k, stream_scores
from influencekit.storage import ScoreStore, merge_score_stores

from .scale_problem import build_problem

RT = ik.Runtime(progress=False)


def _reference_top_k(full: torch.Tensor, k: int):
    """Top-k by a stable full sort: ties go to the smaller training index."""
    helpful = torch.sort(full, dim=1, descending=True, stable=True)
    harmful = torch.sort(full, dim=1, stable=True)
    return (helpful.values[:, :k], helpful.indices[:, :k], harmful.values[:, :k],
            harmful.indices[:, :k])


def _feed(top: RunningTopK, full: torch.Tensor, q_block: int, t_block: int, seed: int):
    """Feed ``full`` in blocks, in a shuffled order."""
    blocks = [(q, t) for q in range(0, full.shape[0], q_block)
              for t in range(0, full.shape[1], t_block)]
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    for i in order.tolist():
        q, t = blocks[i]
        top.update(full[q:q + q_block, t:t + t_block], t, q)
    return top.result()


# -- running top-k ----------------------------------------------------------------------------
@pytest.mark.parametrize("q_block,t_block,k", [(7, 5, 3), (3, 64, 10), (7, 1, 1), (2, 9, 20)])
def test_running_top_k_equals_topk_of_full_matrix(q_block, t_block, k):
    full = torch.randn(7, 61, dtype=torch.float64)
    got = _feed(RunningTopK(7, k), full, q_block, t_block, seed=k)
    k = min(k, 61)
    values, indices = torch.topk(full, k, dim=1)
    assert torch.equal(got.helpful_scores, values) and torch.equal(got.helpful_indices, indices)
    values, indices = torch.topk(full, k, dim=1, largest=False)
    assert torch.equal(got.harmful_scores, values) and torch.equal(got.harmful_indices, indices)


@pytest.mark.parametrize("t_block", [1, 4, 13, 100])
def test_running_top_k_breaks_ties_by_smaller_index(t_block):
    # scores from {-2, ..., 2}: many ties, also at the k-th place of blocks
    g = torch.Generator().manual_seed(1)
    full = torch.randint(-2, 3, (6, 100), generator=g).to(torch.float64)
    got = _feed(RunningTopK(6, 7), full, 4, t_block, seed=t_block)
    hv, hi, lv, li = _reference_top_k(full, 7)
    assert torch.equal(got.helpful_scores, hv) and torch.equal(got.helpful_indices, hi)
    assert torch.equal(got.harmful_scores, lv) and torch.equal(got.harmful_indices, li)
    # torch.topk agrees on the values (its choice among ties is unspecified)
    assert torch.equal(got.helpful_scores, torch.topk(full, 7, dim=1).values)


def test_merged_top_k_of_disjoint_shards_equals_full():
    full = torch.randn(5, 40, dtype=torch.float64)
    a = RunningTopK(5, 6).update(full[:, :17], 0)
    b = RunningTopK(5, 6).update(full[:, 17:], 17)
    got = b.merge(a).result()
    hv, hi, lv, li = _reference_top_k(full, 6)
    assert torch.equal(got.helpful_indices, hi) and torch.equal(got.harmful_indices, li)
    assert torch.equal(got.helpful_scores, hv) and torch.equal(got.harmful_scores, lv)


def test_top_k_compares_mixed_precision_blocks_without_rounding():
    """A float32 block against a float64 k-th best that rounds UP to the block's value."""
    top = RunningTopK(1, 1).update(torch.tensor([[0.99999993]], dtype=torch.float64), 0)
    block = torch.tensor([[0.99999994]], dtype=torch.float32)  # 0.9999999404 > 0.99999993
    assert torch.tensor(0.99999993).float() == block[0, 0]
    assert top.update(block, 1).result().helpful_indices.item() == 1
    # and rows whose block cannot reach the k-th best are left as they were
    top.update(torch.tensor([[0.5]], dtype=torch.float32), 2)
    assert top.result().helpful_indices.item() == 1 and top.seen_.item() == 3


def test_top_k_clips_k_and_names_non_finite_scores():
    top = RunningTopK(2, 10).update(torch.ones(2, 3, dtype=torch.float64), 0)
    assert top.result().helpful_indices.shape == (2, 3)
    bad = torch.zeros(2, 4, dtype=torch.float64)
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="query 1 and training example 12") as info:
        RunningTopK(2, 1).update(bad, 10)
    assert info.value.index == 12
    with pytest.raises(InfluenceKitError, match="k >= 1"):
        RunningTopK(2, 0)


# -- stores -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def problem():
    influence, train, query = build_problem()
    return influence, train, query, influence.pairwise(query, train, RT)


@pytest.mark.parametrize("block_size,query_block", [(5, None), (1, 2), (23, 3), (50, None)])
def test_blocked_store_equals_pairwise(tmp_path, problem, block_size, query_block):
    influence, train, query, full = problem
    result = stream_scores(influence, query, train, k=4, store=tmp_path / "s",
                           block_size=block_size, query_block_size=query_block,
                           store_dtype="float64", runtime=RT)
    store = result.store
    assert store.complete and store.raw().dtype == np.float64
    torch.testing.assert_close(store.scores(), full, rtol=0, atol=1e-12)
    assert result.n_train_scored == 23
    assert result.blocks_computed == store.done().size
    _, hi, _, li = _reference_top_k(full, 4)
    assert torch.equal(result.top_k.helpful_indices, hi)
    assert torch.equal(result.top_k.harmful_indices, li)
    again = store_top_k(store, 4)
    assert torch.equal(again.helpful_scores, result.top_k.helpful_scores)


def test_top_k_without_store_equals_pairwise(problem):
    influence, train, query, full = problem
    result = stream_scores(influence, query, train, k=30, block_size=4, runtime=RT)
    assert result.store is None and result.top_k.helpful_scores.shape == (5, 23)
    hv, hi, lv, li = _reference_top_k(full, 23)
    assert torch.equal(result.top_k.helpful_indices, hi)
    torch.testing.assert_close(result.top_k.harmful_scores, lv, rtol=0, atol=1e-12)


def test_resume_skips_done_blocks_and_gives_the_same_bits(tmp_path, problem):
    influence, train, query, _ = problem
    first = stream_scores(influence, query, train, k=3, store=tmp_path / "s", block_size=4,
                          runtime=RT)
    reference = first.store.raw().copy()
    # lose three blocks, as a killed run would (their done flags unset, values garbage)
    store = ScoreStore.load(tmp_path / "s")
    garbage = np.load(tmp_path / "s" / "scores.npy", mmap_mode="r+")
    for ti in (0, 3, 5):
        cols = store.block_columns(ti)
        garbage[:, cols.start:cols.stop] = 123.0
        store.discard_block(0, ti)
    garbage.flush()
    del garbage
    again = stream_scores(influence, query, train, k=3, store=tmp_path / "s", block_size=4,
                          runtime=RT)
    assert again.blocks_computed == 3
    assert np.array_equal(again.store.raw(), reference)
    assert torch.equal(again.top_k.helpful_indices, first.top_k.helpful_indices)
    assert torch.equal(again.top_k.harmful_scores, first.top_k.harmful_scores)
    done = stream_scores(influence, query, train, k=3, store=tmp_path / "s", block_size=4,
                         runtime=RT)
    assert done.blocks_computed == 0


def test_float32_and_bfloat16_stores(tmp_path, problem):
    influence, train, query, full = problem
    f64 = stream_scores(influence, query, train, store=tmp_path / "f64", block_size=6,
                        store_dtype="float64", runtime=RT).store.scores()
    f32 = stream_scores(influence, query, train, store=tmp_path / "f32", block_size=6,
                        runtime=RT).store
    bf16 = stream_scores(influence, query, train, k=3, store=tmp_path / "bf16", block_size=6,
                         store_dtype="bfloat16", runtime=RT)
    assert f32.raw().dtype == np.float32 and torch.equal(f32.scores(), f64.to(torch.float32))
    assert bf16.store.raw().dtype == np.uint16
    assert torch.equal(bf16.store.scores(), f64.to(torch.bfloat16))
    torch.testing.assert_close(bf16.store.scores().double(), full, rtol=2**-8, atol=1e-12)
    # the top-k is taken from the stored (rounded) scores, so a resumed run agrees with it
    hv, _, _, _ = _reference_top_k(bf16.store.scores().double(), 3)
    assert torch.equal(bf16.top_k.helpful_scores, hv)


@pytest.mark.parametrize("score_dtype,unit_roundoff", [("float32", 2.0**-24),
                                                     ("bfloat16", 2.0**-9)])
def test_low_precision_scoring_within_rounding_bound(problem, score_dtype, unit_roundoff):
    """|s_low − s| ≤ (rounding of both inputs and the output + p·u of the accumulation) ·
    Σ|pre||g| (the standard dot-product error bound; bfloat16 products accumulate in float32)."""
    influence, train, query, full = problem
    result = stream_scores(influence, query, train, k=23, block_size=8, score_dtype=score_dtype,
                           runtime=RT)
    top = result.top_k
    rebuilt = torch.empty_like(full).scatter_(1, top.helpful_indices, top.helpful_scores)
    pre = influence.precondition(query, RT)
    grads = ik.grads.gradients(influence.target, train, RT)
    p = grads.shape[1]
    bound = (3 * unit_roundoff + (p + 3) * 2.0**-24) * (pre.abs() @ grads.abs().T)
    assert bool(((rebuilt - full).abs() <= bound).all())
    assert float((rebuilt - full).abs().max()) > 0  # really computed in low precision


def test_partitioned_and_merged_equals_one_shot(tmp_path, problem):
    influence, train, query, full = problem
    one = stream_scores(influence, query, train, store=tmp_path / "one", block_size=4,
                        runtime=RT).store
    parts = []
    for i in range(3):  # 23 examples: 8, 8, 7
        r = stream_scores(influence, query, train, store=tmp_path / f"p{i}", block_size=4,
                          partition=f"{i}/3", runtime=RT)
        assert r.n_train_scored == len(ik.distributed.Partition(i, 3).range(23))
        assert r.store.columns == ik.distributed.Partition(i, 3).range(23)
        parts.append(tmp_path / f"p{i}")
    merged = merge_score_stores(list(reversed(parts)), tmp_path / "merged")
    assert merged.complete and merged.manifest["partition"] is None
    assert np.array_equal(merged.raw(), one.raw())
    torch.testing.assert_close(merged.scores().double(), full, rtol=1e-6, atol=1e-7)
    # merged stores of one run are the same run as the one-shot store
    assert merged.manifest == one.manifest


def test_merge_refuses_missing_duplicated_incomplete_and_foreign_parts(tmp_path, problem):
    influence, train, query, _ = problem
    for i in range(3):
        stream_scores(influence, query, train, store=tmp_path / f"p{i}", block_size=4,
                      partition=f"{i}/3", runtime=RT)
    p0, p1, p2 = (tmp_path / f"p{i}" for i in range(3))
    with pytest.raises(StoreError, match="partitions 2/3 are missing"):
        merge_score_stores([p0, p1], tmp_path / "m")
    with pytest.raises(StoreError, match="partition 1/3 is given twice"):
        merge_score_stores([p0, p1, p1, p2], tmp_path / "m")
    other, _, _ = build_problem(damping=1e-1)
    stream_scores(other, query, train, store=tmp_path / "q1", block_size=4, partition="1/3",
                  runtime=RT)
    with pytest.raises(StoreError, match="config.inverse.damping is 0.1 vs 0.01"):
        merge_score_stores([p0, tmp_path / "q1", p2], tmp_path / "m")
    store = ScoreStore.load(p2)
    store.discard_block(0, 1)
    with pytest.raises(StoreError, match=r"partition 2/3 .* incomplete \(1 of 2 blocks"):
        merge_score_stores([p0, p1, p2], tmp_path / "m")


def test_store_of_another_run_is_refused_naming_the_field(tmp_path, problem):
    influence, train, query, _ = problem
    folder = tmp_path / "s"
    stream_scores(influence, query, train, store=folder, block_size=4, runtime=RT)

    def rerun(inf=influence, q=query, t=train, **kw):
        kw = {"block_size": 4, **kw}
        return stream_scores(inf, q, t, store=folder, runtime=RT, **kw)

    other_model, _, _ = build_problem(seed=1)
    with pytest.raises(StoreError, match="model_fingerprint .* model's parameters differ"):
        rerun(other_model)
    other_damping, _, _ = build_problem(damping=1e-1)
    with pytest.raises(StoreError, match="config.inverse.damping is 0.01, this run has 0.1"):
        rerun(other_damping)
    shuffled = (train[0].flip(0), train[1].flip(0))
    with pytest.raises(StoreError, match="data_fingerprints.train .*'train' data set differs"):
        rerun(t=shuffled)
    with pytest.raises(StoreError, match="config.score_dtype is 'float64', this run has "
                                         "'float32'"):
        rerun(score_dtype="float32")
    with pytest.raises(StoreError, match="its dtype is 'float32', this run has 'bfloat16'"):
        rerun(store_dtype="bfloat16")
    with pytest.raises(StoreError, match=r"block_shape is \[5, 4\], this run has \[5, 3\]"):
        rerun(block_size=3)
    assert rerun().blocks_computed == 0  # the same run reopens and finds everything done


def test_stream_scores_argument_errors(problem, tmp_path, caplog):
    influence, train, query, _ = problem
    with pytest.raises(InfluenceKitError, match="needs k=.*store="):
        stream_scores(influence, query, train)
    with pytest.raises(InfluenceKitError, match="score_dtype 'float16'"):
        stream_scores(influence, query, train, k=1, score_dtype="float16")
    with pytest.raises(InfluenceKitError, match="'1:3' is not of the form"):
        stream_scores(influence, query, train, k=1, partition="1:3")
    with caplog.at_level(logging.WARNING, logger="influencekit"):
        stream_scores(influence, query, train, k=1, memory_budget=1000, runtime=RT)
    assert "above the budget" in caplog.text


def test_store_commits_blocks_before_marking_them_done(tmp_path):
    store = ScoreStore.open(tmp_path / "s", n_query=2, n_train=6, block_shape=(2, 2),
                            dtype="float64", commit_seconds=3600)
    store.write_block(0, 1, torch.ones(2, 2, dtype=torch.float64))
    on_disk = ScoreStore.load(tmp_path / "s", writable=False)
    assert store.is_done(0, 1) and not on_disk.is_done(0, 1)  # written, not yet committed
    store.commit()
    assert on_disk.is_done(0, 1) and on_disk.done().sum() == 1
    assert torch.equal(on_disk.read_block(0, 1), torch.ones(2, 2, dtype=torch.float64))


def test_store_files_and_errors(tmp_path):
    store = ScoreStore.open(tmp_path / "s", n_query=3, n_train=10, block_shape=(2, 4),
                            dtype="bfloat16", partition="1/2")
    assert store.grid == (2, 2) and store.columns == range(5, 10)
    assert store.block_columns(1) == range(9, 10) and store.block_rows(1) == range(2, 3)
    with pytest.raises(StoreError, match=r"block \(0, 1\) .* shape \(2, 1\), got \(2, 4\)"):
        store.write_block(0, 1, torch.zeros(2, 4))
    store.write_block(1, 1, torch.tensor([[1.0 / 3]]))
    assert store.is_done(1, 1) and not store.complete
    assert store.read_block(1, 1).item() == torch.tensor(1.0 / 3).to(torch.bfloat16).item()
    with pytest.raises(StoreError, match="outside this store's training examples 5..9"):
        store.read(cols=range(0, 6))
    with pytest.raises(StoreError, match="no score store"):
        ScoreStore.load(tmp_path / "none")
    (tmp_path / "s" / "manifest.json").write_text("{oops")
    with pytest.raises(StoreError, match="not valid JSON"):
        ScoreStore.load(tmp_path / "s")
    with pytest.raises(StoreError, match="partition 3/4 of 2 training examples is empty"):
        ScoreStore.open(tmp_path / "e", n_query=1, n_train=2, block_shape=(1, 1),
                        partition="3/4")


def test_datasets_and_loaders_score_like_tensors(tmp_path, problem):
    from torch.utils.data import DataLoader, TensorDataset

    influence, train, query, full = problem
    as_dataset = TensorDataset(*train)
    as_loader = DataLoader(TensorDataset(*query), batch_size=2, shuffle=False)
    result = stream_scores(influence, as_loader, as_dataset, k=3, store=tmp_path / "s",
                           block_size=5, store_dtype="float64", runtime=RT)
    torch.testing.assert_close(result.store.scores(), full, rtol=0, atol=1e-12)
    # the data fingerprints of a Dataset see a changed example
    changed = TensorDataset(train[0].clone(), train[1])
    changed.tensors[0][0, 0] += 1
    with pytest.raises(StoreError, match="data_fingerprints.train"):
        stream_scores(influence, as_loader, changed, store=tmp_path / "s", block_size=5,
                      store_dtype="float64", runtime=RT)
