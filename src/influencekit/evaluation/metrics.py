"""Metrics that hold influence scores against real retraining.

Sign and scale: ``scores [n_query, n_train]`` are the library's s = g_qᵀ(C + λI)⁻¹g_m (positive
= helpful: upweighting the example lowers the query's loss). The predicted change of f when m is
removed is +s/n; a model trained on a subset S is predicted to have f ≈ const − Σ_{m∈S} s/n.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CorrelationResult:
    """``mean`` over queries, its ``stderr``, and ``per_query [n_query]`` (nan where undefined)."""

    mean: float
    stderr: float
    per_query: np.ndarray


def sample_subsets(n_train: int, alpha: float, count: int, seed: int = 0) -> np.ndarray:
    """``count`` random subsets of size round(α·n) as a boolean mask ``[count, n_train]``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    size = int(round(alpha * n_train))
    masks = np.zeros((count, n_train), dtype=bool)
    for row in range(count):
        masks[row, rng.choice(n_train, size=size, replace=False)] = True
    return masks


def lds(scores, subsets, outputs) -> CorrelationResult:
    """Linear datamodeling score (Park et al. 2023).

    Args:
        scores: ``[n_query, n_train]`` influence scores (positive = helpful).
        subsets: boolean ``[n_subsets, n_train]``: which examples each retrained model saw.
        outputs: ``[n_subsets, n_query]``: the measurement f of each query after retraining.

    For each query, the Spearman correlation over subsets between the predicted
    −Σ_{m∈S} s_qm (lower loss when helpful examples are kept) and the real f. Returns the mean
    over queries and its standard error.
    """
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(subsets, dtype=np.float64)
    outputs = np.asarray(outputs, dtype=np.float64)
    predicted = -(masks @ scores.T)  # [n_subsets, n_query]
    per_query = np.array([spearman(predicted[:, q], outputs[:, q])
                          for q in range(scores.shape[0])])
    return _summary(per_query)


def loo_correlation(predicted_changes, real_changes) -> dict:
    """Agreement of predicted and real leave-one-out changes, both ``[n_query, k]``.

    ``predicted_changes`` is the removal effect +s/n. Returns ``pearson`` and ``spearman`` over
    all (query, removed example) pairs pooled, and ``pearson_per_query`` /
    ``spearman_per_query`` (:class:`CorrelationResult` over queries).
    """
    a = np.asarray(predicted_changes, dtype=np.float64)
    b = np.asarray(real_changes, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"predicted {a.shape} and real {b.shape} changes differ in shape")
    pearsons = [pearson(x, y) for x, y in zip(a, b, strict=True)]
    spearmans = [spearman(x, y) for x, y in zip(a, b, strict=True)]
    return {"pearson": pearson(a.ravel(), b.ravel()),
            "spearman": spearman(a.ravel(), b.ravel()),
            "pearson_per_query": _summary(np.array(pearsons)),
            "spearman_per_query": _summary(np.array(spearmans))}


def flip_labels(labels, fraction: float, n_classes: int, seed: int = 0):
    """Give a random ``fraction`` of examples a different random label.

    Returns ``(new_labels [n], flipped [n] bool)``; every flipped label differs from the old one.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=int(round(fraction * n)), replace=False)] = True
    new = labels.copy()
    shift = rng.integers(1, n_classes, size=int(flipped.sum()))
    new[flipped] = (labels[flipped] + shift) % n_classes
    return new, flipped


def auc(ranking_scores, positives) -> float:
    """Area under the ROC curve of ``ranking_scores`` for ``positives`` (Mann-Whitney U, ties
    counted half)."""
    s = np.asarray(ranking_scores, dtype=np.float64)
    pos = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative example")
    from scipy import stats  # imported when used: it costs seconds at import time

    ranks = stats.rankdata(s)  # average ranks for ties
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mislabel_detection(self_influence, flipped, checked=(0.05, 0.1, 0.2, 0.3, 0.5)) -> dict:
    """Rank examples by self-influence (large first) and look for the flipped labels.

    Returns ``auc`` and ``found``: for each fraction of the data checked (in ranking order), the
    fraction of all flipped examples found.
    """
    s = np.asarray(self_influence, dtype=np.float64)
    flipped = np.asarray(flipped, dtype=bool)
    order = np.argsort(-s, kind="stable")
    hits = np.cumsum(flipped[order])
    found = {float(c): float(hits[max(int(round(c * s.size)), 1) - 1] / flipped.sum())
             for c in checked}
    return {"auc": auc(s, flipped), "found": found}


def pearson(x, y) -> float:
    """Pearson correlation of two vectors (arrays or tensors, flattened); nan when one is
    constant."""
    x, y = as_numpy(x), as_numpy(y)
    if np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x, y) -> float:
    """Spearman rank correlation of two vectors; nan when one is constant."""
    from scipy import stats  # imported when used: it costs seconds at import time

    return pearson(stats.rankdata(as_numpy(x)), stats.rankdata(as_numpy(y)))


def as_numpy(values) -> np.ndarray:
    """A flat float64 numpy copy of an array, tensor or sequence."""
    if hasattr(values, "detach"):
        return values.detach().to("cpu").double().numpy().ravel()
    return np.asarray(values, dtype=np.float64).ravel()


def _summary(values: np.ndarray) -> CorrelationResult:
    ok = values[np.isfinite(values)]
    if ok.size == 0:
        return CorrelationResult(float("nan"), float("nan"), values)
    stderr = float(ok.std(ddof=1) / np.sqrt(ok.size)) if ok.size > 1 else float("nan")
    return CorrelationResult(float(ok.mean()), stderr, values)
