"""First-order expansion: is the real response to a weight change linear in ε?

For each chosen example m and each ε (weight 1 + ε; ε = −1 is leave-one-out), the weighted
objective is re-optimised (``response.response_curve``). The real change of the measurement is
taken against the re-optimised ε = 0 solution (so an unconverged θ̂ does not count as
non-linearity); the predicted change is ε g_qᵀ ∂θ/∂w_m. Figure ``"linearity error"``: the max
over examples and ε of ‖real − predicted‖ / ‖real‖ over the queries.

For a model whose measurement is linear in θ and a squared-error objective (least squares), this
error is exactly |ε|·h_m with h_m the leverage of example m.
"""

from __future__ import annotations

import torch

from ..inverse.base import InverseCurvature
from ..response.curve import response_curve
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target
from .report import Finding, judge_at_most

ASSUMPTION = "first-order expansion"


def linearity_errors(target: Target, inverse: InverseCurvature, train, query,
                     indices: list[int], epsilons=(-1.0, 1.0),
                     runtime: Runtime | None = None) -> torch.Tensor:
    """‖real − predicted‖ / ‖real‖ of the measurement change, ``[len(indices), len(epsilons)]``."""
    runtime = resolve_runtime(runtime)
    grid = [0.0] + [float(e) for e in epsilons if e != 0]
    rows = []
    for m in indices:
        curve = response_curve(target, train, m, grid, query, inverse=inverse,
                               runtime=runtime)
        real = curve.measurement[1:] - curve.measurement[0]
        pred = curve.predicted_measurement[1:] - curve.measurement_hat
        rows.append((real - pred).norm(dim=1) / real.norm(dim=1).clamp_min(1e-300))
    return torch.stack(rows)


def linearity_finding(errors: torch.Tensor, indices: list[int], epsilons, *,
                      pass_max: float = 0.1, warn_max: float = 0.3) -> Finding:
    value = float(errors.max())
    verdict, rule = judge_at_most(value, pass_max, warn_max)
    return Finding(ASSUMPTION, "linearity error", value, verdict, rule,
                   f"max over examples {list(indices)} and epsilon {list(epsilons)} of "
                   "||real - first-order change|| / ||real change|| (re-optimised)",
                   {"errors": errors.tolist()})
