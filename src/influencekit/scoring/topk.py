"""A running top-k of scores per query that never holds the full ``[n_query, n_train]`` matrix.

Scores follow the conventions table (``s = g_qᵀ (C + λI)⁻¹ g_m``, no 1/n; with the loss as
measurement s > 0 means training example m helped). Per query it keeps

- the ``k`` most helpful examples: largest scores, in decreasing order;
- the ``k`` most harmful examples: most negative scores, in increasing order;

ties broken by the smaller training index, so the answer does not depend on the order or the
size of the blocks it was fed (nor on how blocks were spread over processes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InfluenceKitError, NonFiniteError

_NO_INDEX = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class TopKScores:
    """The result of a running top-k; every tensor is ``[n_query, k]`` (k clipped to the number
    of training examples seen); scores in the top-k's dtype (float64 by default), indices int64.

    Attributes:
        helpful_scores / helpful_indices: the largest scores, decreasing, and their training
            indices.
        harmful_scores / harmful_indices: the most negative scores, increasing, and their
            training indices.
    """

    helpful_scores: torch.Tensor
    helpful_indices: torch.Tensor
    harmful_scores: torch.Tensor
    harmful_indices: torch.Tensor


class RunningTopK:
    """Top-k helpful and harmful training examples per query, fed score blocks one at a time.

    ``update(block [n_query_block, n_train_block], train_start, query_start=0)`` absorbs the
    scores of training examples ``train_start ...`` for queries ``query_start ...``; ``merge``
    absorbs another RunningTopK (e.g. another process's); ``result()`` returns
    :class:`TopKScores`. Memory: ``4 × n_query × k`` numbers, whatever n_train is.
    """

    def __init__(self, n_query: int, k: int, dtype: torch.dtype = torch.float64):
        if k < 1:
            raise InfluenceKitError(f"top-k needs k >= 1, got k={k}.")
        if n_query < 1:
            raise InfluenceKitError(f"top-k needs at least one query, got n_query={n_query}.")
        self.n_query = n_query
        self.k = k
        self.dtype = dtype
        self.helpful_scores_ = torch.full((n_query, k), -torch.inf, dtype=dtype)
        self.helpful_indices_ = torch.full((n_query, k), _NO_INDEX, dtype=torch.int64)
        self.harmful_scores_ = torch.full((n_query, k), torch.inf, dtype=dtype)
        self.harmful_indices_ = torch.full((n_query, k), _NO_INDEX, dtype=torch.int64)
        self.seen_ = torch.zeros(n_query, dtype=torch.int64)

    def update(self, block: torch.Tensor, train_start: int, query_start: int = 0) -> RunningTopK:
        """Absorb scores ``block[i, j]`` of query ``query_start + i`` and training example
        ``train_start + j``; returns self. Raises :class:`NonFiniteError` on NaN or inf.

        Rows of the block with no score reaching the current k-th best are skipped after one
        comparison, so late blocks of a long stream cost little more than reading them.
        """
        if block.dim() != 2:
            raise InfluenceKitError(f"a score block must be [n_query_block, n_train_block], got "
                                    f"shape {tuple(block.shape)}.")
        if query_start < 0 or query_start + block.shape[0] > self.n_query:
            raise InfluenceKitError(f"query rows {query_start}..{query_start + block.shape[0] - 1}"
                                    f" are outside 0..{self.n_query - 1}.")
        if block.shape[1] == 0:
            return self
        block = block.detach().cpu()
        _check_finite(block, train_start, query_start)
        rows = torch.arange(query_start, query_start + block.shape[0])
        for largest in (True, False):
            # compared in the wider dtype (type promotion), never rounded to the block's
            kth = (self.helpful_scores_ if largest else self.harmful_scores_)[rows, -1, None]
            reach = (block >= kth) if largest else (block <= kth)
            hit = reach.any(dim=1).nonzero().flatten()
            if hit.numel() == 0:
                continue
            sub = block if hit.numel() == block.shape[0] else block[hit]
            values, local = _block_candidates(sub, self.k, largest)
            self._absorb(rows[hit], values.to(self.dtype), local + train_start, largest)
        self.seen_[rows] += block.shape[1]
        return self

    def merge(self, other: RunningTopK) -> RunningTopK:
        """Absorb another top-k over other training examples (e.g. another rank's shard)."""
        if other.n_query != self.n_query or other.k != self.k:
            raise InfluenceKitError(f"cannot merge a top-{other.k} of {other.n_query} queries "
                                    f"into a top-{self.k} of {self.n_query} queries.")
        rows = torch.arange(self.n_query)
        self._absorb(rows, other.helpful_scores_.to(self.dtype), other.helpful_indices_, True)
        self._absorb(rows, other.harmful_scores_.to(self.dtype), other.harmful_indices_, False)
        self.seen_ += other.seen_
        return self

    def result(self) -> TopKScores:
        """:class:`TopKScores` with k clipped to the fewest training examples any query saw."""
        k = min(self.k, int(self.seen_.min()))
        return TopKScores(self.helpful_scores_[:, :k].clone(),
                          self.helpful_indices_[:, :k].clone(),
                          self.harmful_scores_[:, :k].clone(),
                          self.harmful_indices_[:, :k].clone())

    def state(self) -> dict[str, torch.Tensor]:
        """The running state as tensors (what processes exchange to merge)."""
        return {"helpful_scores": self.helpful_scores_, "helpful_indices": self.helpful_indices_,
                "harmful_scores": self.harmful_scores_, "harmful_indices": self.harmful_indices_,
                "seen": self.seen_}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> RunningTopK:
        n_query, k = state["helpful_scores"].shape
        top = cls(n_query, k, state["helpful_scores"].dtype)
        top.helpful_scores_ = state["helpful_scores"].clone()
        top.helpful_indices_ = state["helpful_indices"].clone()
        top.harmful_scores_ = state["harmful_scores"].clone()
        top.harmful_indices_ = state["harmful_indices"].clone()
        top.seen_ = state["seen"].clone()
        return top

    def _absorb(self, rows: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                largest: bool) -> None:
        if largest:
            scores, kept = self.helpful_scores_, self.helpful_indices_
        else:
            scores, kept = self.harmful_scores_, self.harmful_indices_
        all_values = torch.cat([scores[rows], values], dim=1)
        all_indices = torch.cat([kept[rows], indices], dim=1)
        best_values, best_indices = _select(all_values, all_indices, self.k, largest)
        scores[rows] = best_values
        kept[rows] = best_indices


def _select(values: torch.Tensor, indices: torch.Tensor, k: int, largest: bool):
    """The first k of each row ordered by (score, best first; then index, smallest first)."""
    by_index = torch.argsort(indices, dim=1)
    values = torch.gather(values, 1, by_index)
    indices = torch.gather(indices, 1, by_index)
    order = torch.sort(values, dim=1, descending=largest, stable=True).indices[:, :k]
    return torch.gather(values, 1, order), torch.gather(indices, 1, order)


def _block_candidates(block: torch.Tensor, k: int, largest: bool):
    """Per row the k best entries of a block, ties at the k-th value going to smaller columns.

    ``torch.topk`` alone may pick any of several equal values; rows where the k-th value is tied
    with an entry left out are redone with a stable sort.
    """
    k = min(k, block.shape[1])
    values, local = torch.topk(block, k, dim=1, largest=largest, sorted=True)
    kth = values[:, -1:]
    tied_in_block = (block == kth).sum(dim=1)
    tied_kept = (values == kth).sum(dim=1)
    ambiguous = (tied_in_block != tied_kept).nonzero().flatten()
    if ambiguous.numel():
        sub = block[ambiguous]
        order = torch.sort(sub, dim=1, descending=largest, stable=True).indices[:, :k]
        values[ambiguous] = torch.gather(sub, 1, order)
        local[ambiguous] = order
    return values, local


def _check_finite(block: torch.Tensor, train_start: int, query_start: int) -> None:
    if torch.isfinite(block.sum()):  # one cheap pass; locate only when something is off
        return
    bad = ~torch.isfinite(block)
    if not bad.any():  # the sum overflowed, the scores are finite
        return
    i, j = (int(v) for v in bad.nonzero()[0])
    raise NonFiniteError(
        f"the score of query {query_start + i} and training example {train_start + j} is "
        f"{block[i, j].item()}; check the inverse (damping) and the gradients of that example.",
        index=train_start + j)
