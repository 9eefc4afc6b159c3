"""Exact: eigendecomposition of the dense curvature in float64."""

from __future__ import annotations

import warnings

import torch

from ..errors import InfluenceKitError
from .base import InverseCurvature


class Exact(InverseCurvature):
    """``(C + λI)⁻¹`` from the eigendecomposition ``C = V diag(e) Vᵀ`` (float64).

    Args:
        damping: λ ≥ 0 added to every eigenvalue.

    Fitted: ``eigenvalues_ [p]``, ``eigenvectors_ [p, p]``. ``fit_info_`` reports the extreme
    eigenvalues and how many are negative (a non-convex Hessian). Solving raises if some
    ``e + λ`` is (numerically) zero, and warns if some is negative.

    ``fit(curvature, runtime, store=folder)`` writes the dense curvature's sums chunk by chunk
    (resumable); with several processes the sums are split over them and the main process's
    eigendecomposition is broadcast to the others.
    """

    resumable = True

    def __init__(self, damping: float = 0.0):
        self.damping = damping

    def _fit(self, curvature, runtime, store=None):
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        # a curvature that cannot be stored (a projected one) is asked without the argument
        matrix = (curvature.dense(runtime) if store is None
                  else curvature.dense(runtime, store=store))
        dist = runtime.dist
        values = vectors = None
        if dist.is_main:
            values, vectors = torch.linalg.eigh(matrix)
            vectors = vectors.contiguous()
        self.eigenvalues_ = dist.broadcast(values, 0)
        self.eigenvectors_ = dist.broadcast(vectors, 0)
        self._report()

    def _report(self):
        e = self.eigenvalues_
        self.fit_info_.update(min_eigenvalue=float(e[0]), max_eigenvalue=float(e[-1]),
                              n_negative=int((e < 0).sum()))
        shifted = e + self.damping
        scale = float(e.abs().max().clamp_min(1e-300))
        if bool((shifted.abs() <= 1e-12 * scale).any()):
            raise InfluenceKitError(
                f"C + λI is singular (eigenvalue {float(shifted.abs().min()):.3g} with "
                f"damping λ = {self.damping}); increase damping (e.g. Exact(damping="
                f"{max(1e-3 * scale, 1e-8):.1g})), add a regulariser, or use kind='ggn'.")
        if bool((shifted < 0).any()):
            warnings.warn(
                f"C + λI has {int((shifted < 0).sum())} negative eigenvalues (smallest "
                f"{float(shifted[0]):.3g}): the curvature is not convex here, and influence "
                "scores may have the wrong sign. Use kind='ggn' or damping above "
                f"{-float(e[0]):.3g}.", stacklevel=3)

    def _solve(self, grads, runtime=None):
        v = self.eigenvectors_
        g = grads.to(v.dtype).to(v.device)
        return ((g @ v) / (self.eigenvalues_ + self.damping)) @ v.T

    def _state_names(self):
        return ["eigenvalues_", "eigenvectors_"]

    def matrix(self) -> torch.Tensor:
        """The fitted dense ``C`` (without damping), ``[p, p]`` float64."""
        self.check_fitted()
        v = self.eigenvectors_
        return (v * self.eigenvalues_) @ v.T
