"""Numeric stability: does the solver solve, do two methods agree, do scores survive damping?

Figures:

- ``"solver residual"``: max over queries of ‖(C + λI) x − g‖ / ‖g‖ with x = inverse.solve(g),
  g the query gradients, C v from ``Curvature.matvec`` of the inverse's curvature kind;
- ``"method agreement"``: min over queries of the Spearman correlation between the scores of the
  inverse and of a second inverse (Pearson in the details);
- ``"damping sensitivity"``: min over queries and over damping λ/10, 10λ of the top-k overlap
  |top-k(s_λ) ∩ top-k(s_λ')| / k (Spearman in the details).
"""

from __future__ import annotations

import torch

from ..curvature import Curvature
from ..evaluation.metrics import pearson, spearman
from ..inverse.base import InverseCurvature
from ..runtime import Runtime, resolve_runtime
from ..scoring.influence import Influence
from ..task.target import Target
from .common import (
    curvature_kind,
    nanmin,
    refit,
    rowwise,
    scores,
    top_k_overlap,
)
from .report import Finding, judge_at_least, judge_at_most

ASSUMPTION = "numeric stability"


def solver_residuals(target: Target, inverse: InverseCurvature, train, query,
                     runtime: Runtime | None = None) -> torch.Tensor:
    """‖(C + λI) x − g‖ / ‖g‖ for each query gradient g, x = inverse.solve(g): ``[n_query]``."""
    runtime = resolve_runtime(runtime)
    g = Influence(target, inverse).query_gradients(query, runtime)
    x = inverse.solve(g)
    cx = Curvature(target, train, kind=curvature_kind(inverse)).matvec(x, runtime)
    g, x, cx = (t.to(torch.float64) for t in (g, x, cx))
    damping = inverse.damping_vector_().to(device=x.device)
    residual = cx + damping * x - g
    return residual.norm(dim=1) / g.norm(dim=1).clamp_min(1e-300)


def residual_finding(residuals: torch.Tensor, *, pass_max: float = 1e-3,
                     warn_max: float = 0.1) -> Finding:
    value = float(residuals.max())
    verdict, rule = judge_at_most(value, pass_max, warn_max)
    return Finding(ASSUMPTION, "solver residual", value, verdict, rule,
                   "max over queries of ||(C+damping I)x - g||/||g||, x = inverse.solve(g)",
                   {"residuals": residuals.tolist()})


def method_agreement(target: Target, inverse: InverseCurvature, other: InverseCurvature,
                     train, query, runtime: Runtime | None = None, *, pass_min: float = 0.9,
                     warn_min: float = 0.7) -> Finding:
    """Spearman (verdict) and Pearson (details) of the two inverses' scores, per query."""
    runtime = resolve_runtime(runtime)
    a = scores(target, inverse, train, query, runtime)
    b = scores(target, other, train, query, runtime)
    rho = rowwise(spearman, a, b)
    value = nanmin(rho)
    verdict, rule = judge_at_least(value, pass_min, warn_min)
    return Finding(ASSUMPTION, "method agreement", value, verdict, rule,
                   f"min over queries of Spearman({type(inverse).__name__}, "
                   f"{type(other).__name__})",
                   {"spearman": rho, "pearson": rowwise(pearson, a, b),
                    "other": other.get_config()})


def damping_sensitivity(target: Target, inverse: InverseCurvature, train, query,
                        runtime: Runtime | None = None, *, factor: float = 10.0, k: int = 10,
                        pass_min: float = 0.8, warn_min: float = 0.5) -> Finding:
    """Top-k overlap of the scores at λ against λ/factor and λ·factor (inverse refitted).

    With λ = 0 the comparison is against λ' = 1e-4 · ‖C z‖/‖z‖ for a random z (a scale of C).
    """
    runtime = resolve_runtime(runtime)
    base = scores(target, inverse, train, query, runtime)
    damping = inverse.damping_
    if damping > 0:
        others = [damping / factor, damping * factor]
    else:
        z = torch.randn(target.num_params, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
        cz = Curvature(target, train, kind=curvature_kind(inverse)).matvec(z, runtime)
        others = [1e-4 * float(cz.to(torch.float64).norm() / z.norm())]
    overlaps, rhos = {}, {}
    for alt in others:
        s = scores(target, refit(inverse, target, train, runtime, damping=alt), train, query,
                   runtime)
        overlaps[f"{alt:g}"] = rowwise(top_k_overlap, base, s, k)
        rhos[f"{alt:g}"] = rowwise(spearman, base, s)
    value = nanmin([v for row in overlaps.values() for v in row])
    verdict, rule = judge_at_least(value, pass_min, warn_min)
    return Finding(ASSUMPTION, "damping sensitivity", value, verdict, rule,
                   f"min top-{k} overlap of scores at damping {damping:g} vs "
                   f"{', '.join(f'{d:g}' for d in others)}",
                   {"top_k_overlap": overlaps, "spearman": rhos, "k": k})
