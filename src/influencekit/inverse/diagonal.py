"""Diagonal: (diag(C) + λI)⁻¹."""

from __future__ import annotations

import torch

from ..errors import InfluenceKitError
from ..func.products import hessian_vector_products
from ..grads import compute_dtype
from ..task.regularizer import L2Regularizer
from .arnoldi import PROBE_CHUNK
from .base import InverseCurvature, check_parameter_grads

ESTIMATORS = ("auto", "dense", "gradients", "hutchinson")
FISHER_KINDS = ("fisher", "empirical_fisher")


class Diagonal(InverseCurvature):
    """``(diag(C) + λI)⁻¹``: keeps only the diagonal of the curvature.

    Args:
        damping: λ ≥ 0 added to every diagonal entry.
        estimator: how diag(C) is obtained.

            - ``"dense"``: the diagonal of :meth:`Curvature.dense` (exact; p² memory).
            - ``"gradients"``: exact for ``kind="empirical_fisher"`` / ``"fisher"`` without the
              dense matrix: ``Σ w_i g_i² / Σ w`` from per-example gradients (for the Fisher,
              summed over the task's predictive labels with their probabilities), plus
              diag(∇²R). One pass over the data, O(p) memory. Not available for other kinds.
            - ``"hutchinson"``: unbiased estimate ``mean_z z ⊙ (C z)`` over ``probes`` Rademacher
              vectors z (any kind; a pass over the data per 32 probes). NOT exact.
            - ``"auto"`` (default): ``"dense"`` when the dense curvature fits
              ``Runtime.max_dense_bytes``, else ``"gradients"`` for Fisher kinds, else
              ``"hutchinson"``. ``fit_info_["estimator"]`` says which one ran.
        probes: number of Hutchinson probe vectors.
        seed: seed of the probes.

    Fitted: ``diagonal_ [p]`` float64 (diag(C), without damping). Solving raises if some
    ``diag + λ`` is not positive (possible for a Hessian or a Hutchinson estimate).
    """

    def __init__(self, damping: float = 0.0, estimator: str = "auto", probes: int = 256,
                 seed: int = 0):
        self.damping = damping
        self.estimator = estimator
        self.probes = probes
        self.seed = seed

    def _fit(self, curvature, runtime):
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator={self.estimator!r} is not one of {ESTIMATORS}")
        estimator = self._choose(curvature, runtime)
        if estimator == "dense":
            diagonal = torch.diagonal(curvature.dense(runtime)).clone()
        elif estimator == "gradients":
            diagonal = gradient_diagonal(curvature, runtime)
        else:
            generator = torch.Generator().manual_seed(self.seed)
            diagonal = hutchinson_diagonal(curvature, runtime, self.probes, generator)
        self.diagonal_ = diagonal.to(torch.float64).cpu()
        self.fit_info_.update(estimator=estimator, min_diagonal=float(self.diagonal_.min()),
                              max_diagonal=float(self.diagonal_.max()))
        self._check_positive()

    def _choose(self, curvature, runtime) -> str:
        if self.estimator == "gradients" and curvature.kind not in FISHER_KINDS:
            raise ValueError(f"estimator='gradients' gives the diagonal of a Fisher only, not of "
                             f"kind={curvature.kind!r}; use 'dense' or 'hutchinson'.")
        if self.estimator != "auto":
            return self.estimator
        p = curvature.target.num_params
        if p * p * 8 <= runtime.max_dense_bytes:
            return "dense"
        return "gradients" if curvature.kind in FISHER_KINDS else "hutchinson"

    def _check_positive(self):
        shifted = self.diagonal_ + self.damping
        if bool((shifted <= 0).any()):
            raise InfluenceKitError(
                f"{int((shifted <= 0).sum())} entries of diag(C) + λ are not positive (smallest "
                f"{float(shifted.min()):.3g}); increase damping above "
                f"{max(-float(self.diagonal_.min()), 0.0):.3g}, use kind='ggn', or a more "
                "accurate estimator.")

    def _solve(self, grads, runtime=None):
        return grads.to(torch.float64).cpu() / (self.diagonal_ + self.damping)

    def parameter_blocks_(self) -> list[tuple[str, ...]]:
        """Every parameter is its own block (the inverse is diagonal)."""
        return [(name,) for name in self.param_space_.names]

    def solve_per_parameter(self, grads, runtime=None):
        self.check_fitted()
        space = self.param_space_
        check_parameter_grads(space, grads, self.parameter_blocks_())
        slices = space.slices()
        out = {}
        for name, g in grads.items():
            d = (self.diagonal_[slices[name]] + self.damping).to(device=g.device)
            work = torch.promote_types(g.dtype, torch.float32)
            solved = g.reshape(g.shape[0], -1).to(work) / d.to(work)
            out[name] = solved.reshape(g.shape).to(g.dtype)
        return out

    def _state_names(self):
        return ["diagonal_"]


def gradient_diagonal(curvature, runtime) -> torch.Tensor:
    """Exact diag of a (empirical) Fisher: ``Σ_i w_i Σ_y p(y) g_i(y)² / Σw + diag(∇²R)``."""
    dtype = compute_dtype(curvature.target, runtime)
    flat = curvature.target.flat_params(dtype, runtime.device)
    total = torch.zeros(flat.numel(), dtype=torch.float64, device=flat.device)
    for coef, grads in curvature.iter_weighted_gradients(runtime):
        total += (coef[:, None] * grads**2).sum(dim=0).to(torch.float64)
    total /= curvature.total_weight(runtime)
    return total + regularizer_diagonal(curvature.target, flat).to(torch.float64)


def regularizer_diagonal(target, flat: torch.Tensor) -> torch.Tensor:
    """diag(∇²R) ``[p]``: closed form for :class:`L2Regularizer`, else exact unit-vector HVPs."""
    p = flat.numel()
    reg = target.regularizer
    if reg is None:
        return torch.zeros(p, dtype=flat.dtype, device=flat.device)
    if isinstance(reg, L2Regularizer):
        out = torch.zeros(p, dtype=flat.dtype, device=flat.device)
        for name, sl in target.space.slices().items():
            if reg.names is None or name in reg.names:
                out[sl] = reg.strength
        return out

    def r(f):
        return target.regularization(target.space.unflatten(f))
    eye = torch.eye(p, dtype=flat.dtype, device=flat.device)
    return torch.cat([(chunk * hessian_vector_products(r, flat, chunk)).sum(dim=1)
                      for chunk in eye.split(256)])


def hutchinson_diagonal(curvature, runtime, probes: int, generator) -> torch.Tensor:
    """Unbiased estimate ``mean_z z ⊙ (C z)`` of diag(C) over Rademacher probes z."""
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    p = curvature.target.num_params
    z = torch.randint(0, 2, (probes, p), generator=generator).to(torch.float64) * 2 - 1
    total = torch.zeros(p, dtype=torch.float64)
    for chunk in z.split(PROBE_CHUNK):
        total += (chunk * curvature.matvec(chunk, runtime).to(torch.float64).cpu()).sum(dim=0)
    return total / probes
