"""How far to trust an influence answer: one measured figure per assumption, with a verdict.

``check(target, inverse, train, query)`` runs them all with cheap defaults and returns a
:class:`TrustReport`; each figure is also available as a small function.
"""

from .check import ALL, check, estimate_check_seconds
from .convexity import (
                        Spectrum,
                        convexity_findings,
                        eigenvalue_finding,
                        gap_finding,
                        hessian_ggn_gap,
                        hessian_spectrum,
                        negative_mass_finding,
)
from .divergence import (
                        DivergenceCurve,
                        TrainingSetup,
                        continue_training,
                        divergence_examples,
                        divergence_finding,
                        group_divergence,
                        horizon_damping,
                        parameter_divergence,
                        visited_examples,
)
from .linearity import linearity_errors, linearity_finding
from .report import Finding, TrustReport
from .stability import damping_sensitivity, method_agreement, residual_finding, solver_residuals
from .stationarity import (
                        Stationarity,
                        fit_stationarity,
                        objective_gradient,
                        stationarity,
                        weighted_objective_gradient,
)
from .trajectory import checkpoint_agreement

__all__ = [
    "check", "estimate_check_seconds", "ALL", "TrustReport", "Finding",
    "Spectrum", "hessian_spectrum", "hessian_ggn_gap", "convexity_findings",
    "eigenvalue_finding", "negative_mass_finding", "gap_finding",
    "solver_residuals", "residual_finding", "method_agreement", "damping_sensitivity",
    "checkpoint_agreement",
    "TrainingSetup", "DivergenceCurve", "continue_training", "parameter_divergence",
    "group_divergence", "horizon_damping", "divergence_finding", "visited_examples",
    "divergence_examples",
    "linearity_errors", "linearity_finding",
    "stationarity", "Stationarity", "objective_gradient", "fit_stationarity",
    "weighted_objective_gradient",
]
