"""Query batching: each layer's preconditioned query replaced by its best rank-r approximation.

Grosse et al. 2023 (arXiv:2308.03296) score many queries in one pass over the training data by
storing, per layer, a low-rank factorisation of each query's preconditioned gradient
``Q ≈ U_r S_r V_rᵀ`` (SVD, ``Q`` in the layer's ``[d_out, width]`` layout). The score term of a
training token becomes ``Σ_k (δ_t·u_k)(a_t·v_k)``: ``r·(d_out + width)`` numbers per query and
layer instead of ``d_out·width``, and a cost per training token that grows with ``r`` rather
than with the layer's size. At ``r = min(d_out, width)`` the factorisation is exact.

``Influence(target, inverse, query_rank=r)`` turns it on; :func:`query_rank_correlation`
reports how close the rank-r scores are to the full-rank ones.
"""

from __future__ import annotations

import dataclasses

import torch

from ..runtime import Runtime, resolve_runtime
from .factored import KroneckerQuery, low_rank, pairwise_sets, prepare_queries


def query_rank_correlation(influence, query, train, ranks, runtime: Runtime | None = None
                           ) -> dict[int, float]:
    """``{r: Pearson correlation of rank-r scores with full-rank scores}`` for each r.

    Args:
        influence: an :class:`~influencekit.Influence` (its ``query_rank`` is ignored: full rank
            is the reference, each r in ``ranks`` is compared with it).
        query, train: data as for :meth:`~influencekit.Influence.pairwise`.
        ranks: the ranks r ≥ 1 to try.

    The preconditioned queries are computed once (full rank) and truncated per r; all sets are
    scored in ONE pass over the training data. Correlation over every (query, train) pair of
    the ``[n_query, n_train]`` matrices (same sign and scale as ``pairwise``).
    """
    runtime = resolve_runtime(runtime)
    ranks = [int(r) for r in ranks]
    influence.inverse.check_fitted()
    reference = prepare_queries(influence.target, influence.inverse, query, runtime,
                                include_regularizer=influence.include_regularizer)
    sets = [reference] + [truncate(reference, r) for r in ranks]
    scores = pairwise_sets(sets, influence.target, train, runtime)
    base = scores[0].flatten().to(torch.float64)
    return {r: _pearson(base, s.flatten().to(torch.float64))
            for r, s in zip(ranks, scores[1:], strict=True)}


def truncate(prepared, rank: int):
    """The same prepared queries with each Kronecker layer's Q at rank ``rank`` (SVD)."""
    terms = []
    for term in prepared.terms:
        if isinstance(term, KroneckerQuery):
            left, right = low_rank(term.dense(), rank)
            term = KroneckerQuery(term.layer, term.module, left=left, right=right)
        terms.append(term)
    return dataclasses.replace(prepared, terms=terms, rank=rank)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else float("nan")
