"""Where does influence part from real retraining? One step at a time (Bae et al. 2022):

cold-start LOO → warm-start LOO → proximal LOO → PBRF → linearised PBRF (= damped-GGN influence,
Exact) → an approximate solver. Each step's predicted/real removal changes ``[n_query, k]`` are
correlated with the previous step and with the first (cold-start retraining).
"""

from __future__ import annotations

import torch

from ..curvature import Curvature
from ..inverse import Exact
from ..response.pbrf import response_changes
from ..response.retrain import leave_one_out_retrained
from ..runtime import resolve_runtime
from ..scoring.influence import Influence
from .metrics import pearson, spearman


def correlation_table(changes: dict) -> list[dict]:
    """Rows ``{step, pearson_vs_previous, spearman_vs_previous, pearson_vs_first,
    spearman_vs_first}`` for an ordered dict ``step -> changes [n_query, k]`` (pooled pairs)."""
    rows, names = [], list(changes)
    first = _flat(changes[names[0]])
    for i, name in enumerate(names):
        cur = _flat(changes[name])
        prev = _flat(changes[names[i - 1]]) if i else None
        rows.append({"step": name,
                     "pearson_vs_previous": None if prev is None else pearson(prev, cur),
                     "spearman_vs_previous": None if prev is None else spearman(prev, cur),
                     "pearson_vs_first": pearson(first, cur),
                     "spearman_vs_first": spearman(first, cur)})
    return rows


def gap_decomposition(target, train, indices, query, *, damping: float, cold_retrainer,
                      cold_init, seed: int = 0, approximate: dict | None = None,
                      runtime=None) -> dict:
    """Compute every step for removing each example of ``indices``; return
    ``{"changes": {step: [n_query, k]}, "table": correlation_table(changes)}``.

    ``approximate`` maps a method name to a fitted inverse of the same Target (e.g. CG, EKFAC);
    its step is the removal effect +s/n through that inverse. Steps in order: ``cold_loo``,
    ``warm_loo``, ``proximal``, ``pbrf``, ``linearised_pbrf`` and the approximate methods.
    """
    runtime = resolve_runtime(runtime)
    idx = [int(i) for i in indices]
    changes = {"cold_loo": leave_one_out_retrained(target, train, idx, query, cold_retrainer,
                                                   init=cold_init, seed=seed, runtime=runtime)}
    for mode, name in (("loo", "warm_loo"), ("proximal", "proximal"), ("pbrf", "pbrf")):
        changes[name] = response_changes(target, train, idx, query, damping=damping, mode=mode,
                                         runtime=runtime)
    exact = Exact(damping=damping).fit(Curvature(target, train, kind="ggn"), runtime,
                                         stationarity=False)
    inverses = {"linearised_pbrf": exact, **(approximate or {})}
    removed = _rows(train, idx)
    for name, inverse in inverses.items():
        scores = Influence(target, inverse).pairwise(query, removed, runtime)
        changes[name] = scores.to(torch.float64) / inverse.n_train_
    return {"changes": changes, "table": correlation_table(changes)}


def _flat(t):
    return torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu().numpy()


def _rows(train, idx):
    from ..response.retrain import subset_data
    return subset_data(train, idx, resolve_runtime(None))
