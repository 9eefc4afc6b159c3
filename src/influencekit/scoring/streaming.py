"""Streaming scores: query × train in blocks, into a running top-k and/or a score store.

Never holds the ``[n_query, n_train]`` matrix: per block of queries the preconditioned query
gradients ``(C + λI)⁻¹ g_q`` ``[n_query_block, p]`` are held, training gradients ``[B, p]`` are
streamed block by block, and each score block ``[n_query_block, B]`` goes to a
:class:`~influencekit.scoring.topk.RunningTopK` and/or a
:class:`~influencekit.storage.ScoreStore` before the next block is computed.

Scores follow the conventions table: ``s = g_qᵀ (C + λI)⁻¹ g_m``, ``[n_query, n_train]``, no 1/n;
with the loss as measurement s > 0 means the training example helped.

Work is split three ways, all over training examples, all landing on the same block grid (so a
block's scores are the same bits however the work was split):

- a :class:`~influencekit.distributed.Partition` (``"3/8"``): this job's contiguous share of the
  training examples, written to a partial store; ``merge_score_stores`` joins the partitions;
- a :class:`~influencekit.distributed.DistContext`: within the partition, each rank takes a
  contiguous share of the blocks (uneven shares allowed) and writes them to the shared store;
  the top-k of the ranks are merged so every rank returns the same answer;
- a store: blocks already marked done are skipped (read back for the top-k), so a killed run
  resumes where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..distributed import DistContext, Partition
from ..errors import InfluenceKitError, StoreError
from ..grads import as_loader, iter_gradients, num_examples, take
from ..runtime import Runtime, resolve_runtime
from ..storage import ScoreStore, data_fingerprint, fingerprint
from .influence import Influence
from .topk import RunningTopK, TopKScores

logger = logging.getLogger("influencekit")

SCORE_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StreamedScores:
    """What :func:`stream_scores` produced.

    Attributes:
        top_k: helpful / harmful top-k per query (None when ``k`` was not given). With a
            partition, the top-k of that partition's training examples only.
        store: the (partial) score store, or None.
        n_train_scored: training examples covered by this run, summed over ranks (done blocks
            included): the partition's size.
        blocks_computed: score blocks computed in this call, summed over ranks (blocks found
            done in the store are not counted).
    """

    top_k: TopKScores | None
    store: ScoreStore | None
    n_train_scored: int
    blocks_computed: int


def stream_scores(influence: Influence, query, train, *, k: int | None = None, store=None,
                  runtime: Runtime | None = None, context: DistContext | None = None,
                  partition: Partition | str | None = None, block_size: int | None = None,
                  query_block_size: int | None = None, score_dtype: str | None = None,
                  store_dtype: str = "float32", fingerprints: dict | None = None,
                  memory_budget: int | None = None,
                  commit_seconds: float = 1.0) -> StreamedScores:
    """Score ``query × train`` in blocks into a top-k (``k``) and/or a score store (``store``).

    Args:
        influence: an :class:`Influence` with a fitted inverse.
        query, train: data as for :meth:`Influence.pairwise` (tensors, a Dataset, or a
            DataLoader that does not shuffle; random access is needed to take blocks of rows).
        k: keep the k most helpful and k most harmful training examples per query.
        store: a folder for a :class:`ScoreStore` (created, or reopened to resume).
        runtime: how to run; its batch size is the default ``block_size``. With several
            processes in ``runtime.context``, the query preconditioning is split over them too
            (and, for CG / LiSSA / Arnoldi, its curvature products).
        context: a :class:`DistContext` (default: ``runtime.context``, else one process).
        partition: ``"i/n"``: score only that share of the training examples (a partial store).
        block_size: training examples per block (one GEMM, one done flag).
        query_block_size: queries preconditioned at once (default all, or the store's block
            rows). With several query blocks the training gradients are recomputed per block.
        score_dtype: dtype of the score GEMM (``"float32"``, ``"bfloat16"``, ``"float64"``;
            default the gradients' dtype).
        store_dtype: dtype of the stored scores (``"float32"``, ``"bfloat16"``, ``"float64"``).
            With a store, the top-k is fed the stored (rounded) scores, so a resumed run gives
            the same top-k as an uninterrupted one.
        fingerprints: ``{"train": ..., "query": ...}`` to identify the data sets in the store's
            manifest (default: :func:`data_fingerprint` of each).
        memory_budget: bytes; log a warning before starting when the estimated working memory
            exceeds it (default: the memory available on this machine).
        commit_seconds: how often the store's written blocks are flushed and marked done (a
            killed run loses at most this much work; 0 commits after every block).

    Returns :class:`StreamedScores`; the scores of the run are ``store.scores()``.
    """
    if k is None and store is None:
        raise InfluenceKitError("stream_scores needs k= (a running top-k), store= (a folder for "
                                "the score matrix), or both; otherwise nothing is kept.")
    influence._check()  # the inverse belongs to this model, also when every block is done
    runtime = resolve_runtime(runtime)
    context = context if context is not None else runtime.dist
    partition = Partition.parse(partition)
    n_query = num_examples(as_loader(query, runtime, "query data"))
    n_train = num_examples(as_loader(train, runtime, "training data"))
    block_size = int(block_size or runtime.batch_size)
    if block_size < 1:
        raise InfluenceKitError(f"block_size must be positive, got {block_size}.")
    if query_block_size is not None and query_block_size < 1:
        raise InfluenceKitError(f"query_block_size must be positive, got {query_block_size}.")
    dtype = _score_dtype(influence, runtime, score_dtype)
    scores = _open_store(store, influence, query, train, runtime, context, partition,
                         n_query, n_train, (query_block_size or n_query, block_size), dtype,
                         store_dtype, fingerprints, commit_seconds) if store is not None else None
    if scores is not None:
        query_block_size = scores.block_shape[0]
    grid = _Grid(n_query, partition.range(n_train), query_block_size or n_query, block_size)
    _warn_if_over_budget(influence, grid, dtype, k, memory_budget)
    top = RunningTopK(n_query, k) if k is not None else None
    mine = context.shard(grid.n_train_blocks)
    computed = 0
    try:
        for qi in range(grid.n_query_blocks):
            computed += _score_query_block(influence, query, train, runtime, grid, qi, mine,
                                           dtype, scores, top)
    finally:  # what was computed is kept, also when this run raises
        if scores is not None:
            scores.commit()
    context.barrier()
    if top is not None and context.is_distributed:
        top = _gather_top_k(top, context)
    covered = sum(len(grid.train_block(ti)) for ti in mine)
    return StreamedScores(top.result() if top is not None else None, scores,
                          context.sum(covered), context.sum(computed))


def score_block(pre: torch.Tensor, grads: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scores ``[n_query_block, B]`` = ``pre [n_query_block, p] @ grads [B, p]ᵀ`` in ``dtype``."""
    return pre.to(dtype) @ grads.to(dtype).T


def store_top_k(store: ScoreStore, k: int, dtype: torch.dtype = torch.float64) -> TopKScores:
    """Top-k helpful / harmful per query of a (complete) store, read block by block."""
    top = RunningTopK(store.n_query, k, dtype)
    n_qb, n_tb = store.grid
    for qi in range(n_qb):
        for ti in range(n_tb):
            if not store.is_done(qi, ti):
                raise InfluenceKitError(f"block ({qi}, {ti}) of {store.folder} is not done; "
                                        "resume the scoring run first.")
            top.update(store.read_block(qi, ti), store.block_columns(ti).start,
                       store.block_rows(qi).start)
    return top.result()


def run_config(influence: Influence, runtime: Runtime, score_dtype: torch.dtype) -> dict:
    """What a score store records about the run (any difference refuses to mix stores)."""
    inverse, target = influence.inverse, influence.target
    inverse.check_fitted()
    return {
        "inverse": inverse.get_config(),
        "inverse_fit": {key: inverse.fit_info_.get(key)
                        for key in ("kind", "n_train", "fingerprint")},
        "inverse_state": fingerprint(inverse.state_dict()),
        "task": _describe(target.task),
        "regularizer": _describe(target.regularizer),
        "params": list(target.space.names),
        "gradient_dtype": str(_gradient_dtype(influence, runtime)).replace("torch.", ""),
        "score_dtype": str(score_dtype).replace("torch.", ""),
    }


# -- the block loop ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Grid:
    n_query: int
    columns: range
    query_block_size: int
    train_block_size: int

    @property
    def n_query_blocks(self) -> int:
        return -(-self.n_query // self.query_block_size)

    @property
    def n_train_blocks(self) -> int:
        return -(-len(self.columns) // self.train_block_size)

    def query_rows(self, qi: int) -> range:
        return range(qi * self.query_block_size,
                     min((qi + 1) * self.query_block_size, self.n_query))

    def train_block(self, ti: int) -> range:
        start = self.columns.start + ti * self.train_block_size
        return range(start, min(start + self.train_block_size, self.columns.stop))


def _score_query_block(influence, query, train, runtime, grid: _Grid, qi: int, mine: range,
                       dtype, store: ScoreStore | None, top: RunningTopK | None) -> int:
    rows = grid.query_rows(qi)
    pending = [ti for ti in mine if store is None or not store.is_done(qi, ti)]
    if top is not None and store is not None:
        for ti in sorted(set(mine) - set(pending)):
            top.update(store.read_block(qi, ti), grid.train_block(ti).start, rows.start)
    # with a distributed runtime preconditioning is collective: every process takes part when
    # any process has blocks left
    if not (runtime.dist.sum(len(pending)) if runtime.dist.is_distributed else pending):
        return 0
    pre = influence.precondition(take(query, rows, runtime, "query data"), runtime)
    if not pending:
        return 0
    pre = pre.to(dtype)
    block_runtime = runtime.replace(batch_size=grid.train_block_size)
    for first, last in _runs(pending):
        span = range(grid.train_block(first).start, grid.train_block(last).stop)
        data = take(train, span, block_runtime, "training data")
        for start, grads in iter_gradients(influence.target, data, block_runtime, of="loss",
                                           desc="scoring train", first=span.start):
            local_start = start - span.start
            ti = first + local_start // grid.train_block_size
            if local_start % grid.train_block_size or grads.shape[0] != len(grid.train_block(ti)):
                raise InfluenceKitError(
                    f"the training data came in a batch of {grads.shape[0]} rows at position "
                    f"{start}, not in blocks of {grid.train_block_size}; pass "
                    "tensors or a Dataset (not a DataLoader with its own batch sampler).")
            block = score_block(pre, grads, dtype)
            if store is not None:
                store.write_block(qi, ti, block)
                block = block.to(store.dtype)
            if top is not None:
                top.update(block, span.start + local_start, rows.start)
    return len(pending)


def _runs(blocks: list[int]):
    """Maximal runs of consecutive block indices: ``[0, 1, 2, 5, 6]`` -> (0, 2), (5, 6)."""
    first = prev = blocks[0]
    for b in blocks[1:]:
        if b != prev + 1:
            yield first, prev
            first = b
        prev = b
    yield first, prev


def _gather_top_k(top: RunningTopK, context: DistContext) -> RunningTopK:
    state = {name: context.all_gather_rows(t) for name, t in top.state().items()}
    n = top.n_query
    merged = None
    for r in range(context.world_size):
        part = RunningTopK.from_state({name: t[r * n:(r + 1) * n] for name, t in state.items()})
        merged = part if merged is None else merged.merge(part)
    return merged


# -- the store --------------------------------------------------------------------------------
def _open_store(folder, influence, query, train, runtime, context, partition, n_query, n_train,
                block_shape, dtype, store_dtype, fingerprints, commit_seconds) -> ScoreStore:
    fingerprints = dict(fingerprints or {})
    for name, data in (("train", train), ("query", query)):
        if name not in fingerprints:
            fingerprints[name] = data_fingerprint(data)
    kwargs = dict(n_query=n_query, n_train=n_train, block_shape=block_shape, dtype=store_dtype,
                  config=run_config(influence, runtime, dtype),
                  model_fingerprint=influence.target.fingerprint(),
                  data_fingerprints=fingerprints, partition=partition,
                  commit_seconds=commit_seconds)
    error = None
    if context.is_main:  # one process creates the files; the others open them after
        try:
            ScoreStore.open(folder, **kwargs)
        except StoreError as exc:
            error = exc
    failed = context.sum(int(error is not None))  # also the barrier before the others open
    if error is not None:
        raise error
    if failed:
        raise StoreError(f"rank 0 could not open the score store {folder} (see its error).")
    return ScoreStore.open(folder, **kwargs)


# -- configuration helpers ----------------------------------------------------------------------
def _gradient_dtype(influence: Influence, runtime: Runtime) -> torch.dtype:
    if runtime.dtype is not None:
        return runtime.dtype
    return next(iter(influence.target.params().values())).dtype


def _score_dtype(influence, runtime, score_dtype) -> torch.dtype:
    if score_dtype is None:
        return _gradient_dtype(influence, runtime)
    if isinstance(score_dtype, torch.dtype):
        score_dtype = str(score_dtype).replace("torch.", "")
    if score_dtype not in SCORE_DTYPES:
        raise InfluenceKitError(f"score_dtype {score_dtype!r} is not one of "
                                f"{sorted(SCORE_DTYPES)}.")
    return SCORE_DTYPES[score_dtype]


def _describe(obj) -> dict | None:
    if obj is None:
        return None
    out = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    for name, value in sorted(vars(obj).items()):
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[name] = value
        elif isinstance(value, torch.Tensor):
            out[name] = fingerprint(value)
    return out


def _warn_if_over_budget(influence, grid: _Grid, dtype, k, memory_budget) -> None:
    from ..planner import available_memory, gradient_memory_bytes, scoring_memory_bytes

    budget = memory_budget if memory_budget is not None else available_memory()
    p, itemsize = influence.target.num_params, torch.empty((), dtype=dtype).element_size()
    need = (scoring_memory_bytes(p, min(grid.query_block_size, grid.n_query),
                                 grid.train_block_size, itemsize, k)
            + gradient_memory_bytes(p, grid.train_block_size, 0, itemsize))
    if budget is not None and need > budget:
        logger.warning(
            "streaming scores need about %.2f GiB of working memory, above the budget of %.2f "
            "GiB: lower block_size or query_block_size (influencekit.plan suggests sizes).",
            need / 1024**3, budget / 1024**3)
