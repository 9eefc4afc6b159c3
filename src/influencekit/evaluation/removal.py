"""Removal curves: take away the k training examples a score ranks most helpful, retrain, and see
how much the query's measurement rises (beside k random examples)."""

from __future__ import annotations

import numpy as np
import torch

from ..grads.data import as_loader, num_examples
from ..response.curve import measure
from ..runtime import Runtime, resolve_runtime


def removal_curve(target, train, query, query_index: int, scores, ks, retrainer, *,
                  init=None, seed: int = 0, random_seed: int = 0,
                  runtime: Runtime | None = None) -> dict:
    """Change of f(z_q) after removing the top-k examples by ``scores`` and retraining.

    Args:
        scores: ``[n_train]`` scores of the training examples on this query (positive =
            helpful: their removal should raise the query's loss most).
        ks: the numbers of examples to remove.

    Returns ``{"k": [len(ks)], "top": [len(ks)], "random": [len(ks)]}``: f after retraining
    without the top-k (resp. k random) examples minus f after retraining on everything (same
    ``init`` and ``seed`` throughout).
    """
    runtime = resolve_runtime(runtime)
    n = num_examples(as_loader(train, runtime, "training data"))
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    shuffled = np.random.default_rng(random_seed).permutation(n)
    one = _one(query, query_index)

    def f_without(removed):
        keep = np.setdiff1d(np.arange(n), removed)
        theta = retrainer.retrain(target, train, keep, seed=seed, init=init, runtime=runtime)
        return float(measure(target, theta.to(torch.float64), one, runtime)[0])

    base = f_without(np.array([], dtype=int))
    top = [f_without(order[:k]) - base for k in ks]
    rand = [f_without(shuffled[:k]) - base for k in ks]
    return {"k": list(ks), "top": top, "random": rand}


def _one(query, index):
    if isinstance(query, (tuple, list)):
        return tuple(t[index:index + 1] for t in query)
    from torch.utils.data import Subset
    return Subset(query, [index])
