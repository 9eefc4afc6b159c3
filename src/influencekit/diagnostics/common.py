"""Small helpers shared by the diagnostics: copies of a Target, refits, rank statistics."""

from __future__ import annotations

import copy

import torch

from ..curvature import Curvature
from ..inverse.base import InverseCurvature
from ..response.optimize import write_params
from ..runtime import Runtime
from ..scoring.influence import Influence
from ..task.target import Target


def copy_target(target: Target, flat: torch.Tensor | None = None) -> Target:
    """A Target over a deep copy of the model (optionally with flat θ written into the copy).

    The user's model is never written: every diagnostic that moves parameters works on a copy.
    """
    model = copy.deepcopy(target.model)
    out = Target(model, target.task, params=list(target.space.names),
                 regularizer=target.regularizer)
    if flat is not None:
        write_params(out, flat)
    return out


def curvature_kind(inverse: InverseCurvature) -> str:
    inverse.check_fitted()
    return inverse.fit_info_["kind"]


def refit(inverse: InverseCurvature, target: Target, train, runtime: Runtime,
          **changes) -> InverseCurvature:
    """``inverse.clone(**changes)`` fitted on the curvature of the same kind of ``target`` on
    ``train``."""
    fresh = inverse.clone(**changes)
    return fresh.fit(Curvature(target, train, kind=curvature_kind(inverse)), runtime,
                     stationarity=False)


def scores(target: Target, inverse: InverseCurvature, train, query,
           runtime: Runtime) -> torch.Tensor:
    """Influence scores ``[n_query, n_train]`` (conventions: s = g_qᵀ (C + λI)⁻¹ g_m)."""
    return Influence(target, inverse).pairwise(query, train, runtime).to(torch.float64)


def top_k_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """|top-k(a) ∩ top-k(b)| / k for two score vectors (largest scores = most helpful)."""
    k = min(k, a.numel())
    ta = set(torch.topk(a.flatten(), k).indices.tolist())
    tb = set(torch.topk(b.flatten(), k).indices.tolist())
    return len(ta & tb) / k


def rowwise(fn, a: torch.Tensor, b: torch.Tensor, *args) -> list[float]:
    """``fn`` applied to matching rows of two ``[n_query, n_train]`` matrices."""
    return [fn(a[i], b[i], *args) for i in range(a.shape[0])]


def nanmin(values) -> float:
    finite = [v for v in values if v == v]
    return float(min(finite)) if finite else float("nan")


def nanmean(values) -> float:
    finite = [v for v in values if v == v]
    return float(sum(finite) / len(finite)) if finite else float("nan")
