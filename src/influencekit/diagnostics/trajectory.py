"""Training trajectory: would the answer change had we stopped training at another checkpoint?

Figure ``"checkpoint agreement"``: for every checkpoint θ_c (a flat ``[p]`` vector), the inverse is
refitted (same class and settings) at θ_c on a copy of the model and the scores recomputed; the
figure is the minimum over checkpoints of the mean over queries of the Spearman correlation with
the scores at the Target's current parameters (the final model). Top-k overlap in the details.
"""

from __future__ import annotations

import torch

from ..evaluation.metrics import spearman
from ..inverse.base import InverseCurvature
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target
from .common import copy_target, nanmean, nanmin, refit, rowwise, scores, top_k_overlap
from .report import Finding, judge_at_least

ASSUMPTION = "training trajectory"


def checkpoint_agreement(target: Target, inverse: InverseCurvature, train, query,
                         checkpoints: list[torch.Tensor], runtime: Runtime | None = None, *,
                         k: int = 10, pass_min: float = 0.8, warn_min: float = 0.5) -> Finding:
    """Rank agreement of scores at each checkpoint with the final scores (see module doc)."""
    runtime = resolve_runtime(runtime)
    if not checkpoints:
        raise ValueError("checkpoints is empty: pass a list of flat parameter vectors [p]")
    final = scores(target, inverse, train, query, runtime)
    rho, overlap = [], []
    for flat in checkpoints:
        if flat.shape != (target.num_params,):
            raise ValueError(f"a checkpoint must be a flat vector [p] = [{target.num_params}], "
                             f"got {tuple(flat.shape)}; use target.space.flatten(...)")
        at = copy_target(target, flat)
        s = scores(at, refit(inverse, at, train, runtime), train, query, runtime)
        rho.append(nanmean(rowwise(spearman, final, s)))
        overlap.append(nanmean(rowwise(top_k_overlap, final, s, k)))
    value = nanmin(rho)
    verdict, rule = judge_at_least(value, pass_min, warn_min)
    return Finding(ASSUMPTION, "checkpoint agreement", value, verdict, rule,
                   f"min over {len(checkpoints)} checkpoints of mean Spearman vs final scores",
                   {"spearman": rho, "top_k_overlap": overlap, "k": k})
