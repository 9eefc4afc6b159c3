"""Candidate filtering: TF-IDF picks the training texts worth scoring exactly.

Grosse et al. 2023 (arXiv:2308.03296) score each query against a few thousand training
sequences chosen by TF-IDF similarity instead of the whole corpus. Here:

- :func:`tfidf_candidates` ranks the training texts by the cosine similarity of their TF-IDF
  vectors (scikit-learn's ``TfidfVectorizer``, fitted on the training texts) to each query's
  text and keeps the top M: ``[n_query, M]`` indices, most similar first (ties: smaller index);
- :func:`candidate_scores` scores each query against its own candidates exactly (the Influence's
  path, factored for block-diagonal inverses), ``[n_query, M]`` aligned with the candidates,
  same sign and scale as :meth:`~influencekit.Influence.pairwise`;
- :func:`candidate_recall` reports, per M, the share of the unfiltered top-k that the first M
  candidates contain: how much the filter loses.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InfluenceKitError
from ..grads import take
from ..runtime import Runtime, resolve_runtime

RANKINGS = ("helpful", "harmful", "magnitude")


def tfidf_candidates(query_texts, train_texts, m: int, **vectorizer) -> torch.Tensor:
    """``[n_query, M]`` (int64): the M training texts most similar to each query's text.

    Args:
        query_texts, train_texts: lists of strings (for token ids, join them as words, e.g.
            ``" ".join(f"t{i}" for i in ids)``).
        m: candidates per query (at most the number of training texts).
        **vectorizer: passed to ``sklearn.feature_extraction.text.TfidfVectorizer`` (e.g.
            ``ngram_range=(1, 2)``); it is fitted on the training texts.

    Similarity: cosine of the (l2-normalised) TF-IDF vectors; ties broken by the smaller index.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    train_texts, query_texts = list(train_texts), list(query_texts)
    if not train_texts or not query_texts:
        raise InfluenceKitError("tfidf_candidates needs at least one query and one training "
                                "text.")
    if not 1 <= int(m) <= len(train_texts):
        raise InfluenceKitError(f"m must be between 1 and the number of training texts "
                                f"({len(train_texts)}), got {m}.")
    model = TfidfVectorizer(**vectorizer)
    train_matrix = model.fit_transform(train_texts)
    similarity = (model.transform(query_texts) @ train_matrix.T).toarray()   # [n_q, n_train]
    return torch.from_numpy(_top_m(similarity, int(m)))


def _top_m(similarity: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m largest entries per row, largest first, ties by smaller index."""
    n = similarity.shape[1]
    out = np.empty((similarity.shape[0], m), dtype=np.int64)
    for i, row in enumerate(similarity):
        order = np.lexsort((np.arange(n), -row))
        out[i] = order[:m]
    return out


def candidate_scores(influence, query, train, candidates: torch.Tensor,
                     runtime: Runtime | None = None) -> torch.Tensor:
    """``[n_query, M]``: query q's exact score with training example ``candidates[q, j]``.

    The union of all queries' candidates is scored once (``influence.pairwise`` on those
    training rows only), so the cost is that of ``|union|`` training examples, not ``n_train``.
    Same sign and scale as :meth:`~influencekit.Influence.pairwise`.
    """
    runtime = resolve_runtime(runtime)
    candidates = torch.as_tensor(candidates, dtype=torch.long)
    union, position = torch.unique(candidates, return_inverse=True)
    subset = take(train, union.tolist(), runtime, "training data")
    scores = influence.pairwise(query, subset, runtime)                 # [n_query, |union|]
    if scores.shape[0] != candidates.shape[0]:
        raise InfluenceKitError(f"candidates has {candidates.shape[0]} rows but the query data "
                                f"{scores.shape[0]} examples; give one row per query.")
    return torch.gather(scores, 1, position.to(scores.device))


def top_k_indices(scores: torch.Tensor, k: int, by: str = "helpful") -> torch.Tensor:
    """``[n_query, k]`` indices of each query's top-k training examples: ``"helpful"`` (largest
    s), ``"harmful"`` (most negative) or ``"magnitude"`` (largest |s|); ties by smaller index."""
    if by not in RANKINGS:
        raise InfluenceKitError(f"by={by!r} is not one of {RANKINGS}")
    key = {"helpful": scores, "harmful": -scores, "magnitude": scores.abs()}[by]
    return torch.from_numpy(_top_m(key.detach().cpu().to(torch.float64).numpy(), k))


def candidate_recall(scores: torch.Tensor, candidates: torch.Tensor, k: int, ms,
                     by: str = "helpful") -> dict[int, float]:
    """``{M: mean over queries of |top-k ∩ first M candidates| / k}``.

    Args:
        scores: the unfiltered scores ``[n_query, n_train]`` (e.g. ``Influence.pairwise``).
        candidates: ``[n_query, M_max]`` from :func:`tfidf_candidates` (most similar first).
        k: size of the unfiltered top-k (ranked ``by``, see :func:`top_k_indices`).
        ms: the candidate counts M ≤ M_max to report.
    """
    candidates = torch.as_tensor(candidates, dtype=torch.long).cpu()
    if candidates.shape[0] != scores.shape[0]:
        raise InfluenceKitError(f"scores has {scores.shape[0]} queries, candidates "
                                f"{candidates.shape[0]}.")
    top = top_k_indices(scores, k, by)
    out = {}
    for m in ms:
        if not 1 <= int(m) <= candidates.shape[1]:
            raise InfluenceKitError(f"M={m} is outside 1..{candidates.shape[1]} (the candidates "
                                    "given); ask tfidf_candidates for more.")
        hits = [len(set(top[q].tolist()) & set(candidates[q, :int(m)].tolist()))
                for q in range(scores.shape[0])]
        out[int(m)] = float(np.mean(hits)) / k
    return out
