"""Identity: the curvature taken as zero, (0 + λI)⁻¹ = I/λ."""

from __future__ import annotations

import torch

from .base import InverseCurvature, check_parameter_grads


class Identity(InverseCurvature):
    """``(C + λI)⁻¹ ≈ I / λ``: the curvature is assumed to be zero (C ≈ 0).

    With ``damping = λ > 0`` solving returns ``g / λ``, the exact damped inverse when C = 0, and
    scores are plain gradient dot products ``g_qᵀ g_m / λ``. With ``damping = 0`` (the default)
    ``I / 0`` is undefined; it is taken to mean "no preconditioning", ``solve(g) = g``, so scores
    are the plain dot products ``g_qᵀ g_m`` (as in TracIn at one checkpoint or gradient
    similarity). ``fit`` reads nothing but the data size and the model fingerprint; there is no
    fitted tensor.
    """

    def __init__(self, damping: float = 0.0):
        self.damping = damping

    def _fit(self, curvature, runtime):
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")

    def _solve(self, grads, runtime=None):
        g = grads.to(torch.float64)
        return g / self.damping if self.damping > 0 else g.clone()

    def parameter_blocks_(self) -> list[tuple[str, ...]]:
        """Every parameter is its own block."""
        return [(name,) for name in self.param_space_.names]

    def solve_per_parameter(self, grads, runtime=None):
        self.check_fitted()
        check_parameter_grads(self.param_space_, grads, self.parameter_blocks_())
        if self.damping > 0:
            return {name: g / self.damping for name, g in grads.items()}
        return {name: g.clone() for name, g in grads.items()}

    def _state_names(self):
        return []
