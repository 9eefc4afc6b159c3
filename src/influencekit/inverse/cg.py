"""CG: matrix-free conjugate gradients on (C + λI) x = g, batched over the right-hand sides."""

from __future__ import annotations

import warnings

import torch

from ..errors import ConvergenceError
from .lazy import LazyInverse

ON_FAILURE = ("warn", "raise", "ignore")


class CG(LazyInverse):
    """``(C + λI)⁻¹ g`` by conjugate gradients with curvature-vector products.

    Every iteration is ONE pass over the training data that multiplies all still-unconverged rows
    of ``grads [k, p]`` at once, so solve many rows together rather than one at a time. Each row
    runs its own CG recurrence and stops when its relative residual reaches ``tol``; the result is
    the same as solving the rows one by one.

    Args:
        damping: λ ≥ 0 in ``(C + λI)⁻¹`` (same meaning as for every inverse).
        max_iter: most iterations (passes over the data) per solve.
        tol: target relative residual ``‖(C + λI)x − g‖ / ‖g‖`` per row.
        on_failure: what to do when some row misses ``tol`` after ``max_iter`` iterations:
            ``"warn"`` (default), ``"raise"`` (:class:`ConvergenceError`) or ``"ignore"``.

    Lazy: ``fit`` only records the curvature operator and the Runtime; the training data is
    needed at every solve, and a stored CG keeps only its settings and ``fit_info_`` (re-attach
    the curvature with :meth:`attach` after loading; see :mod:`influencekit.inverse.lazy`).

    After each solve: ``last_residuals_ [k]`` float64, the TRUE relative residual of each row
    (recomputed with one extra pass, not the recurrence's estimate), and ``last_iterations_ [k]``.
    CG needs C + λI positive definite: a non-positive curvature along a search direction (an
    indefinite Hessian) raises :class:`ConvergenceError`.
    """

    def __init__(self, damping: float = 0.0, max_iter: int = 100, tol: float = 1e-6,
                 on_failure: str = "warn"):
        self.damping = damping
        self.max_iter = max_iter
        self.tol = tol
        self.on_failure = on_failure

    def _check_settings(self):
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol}")
        if self.on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure={self.on_failure!r} is not one of {ON_FAILURE}")

    def _solve(self, grads, runtime=None):
        g = grads.to(torch.float64)
        x, iterations = conjugate_gradients(self._matvec, g, self.max_iter, self.tol)
        residuals = relative_residuals(self._matvec(x) - g, g)
        self.last_residuals_ = residuals
        self.last_iterations_ = iterations
        self._report(residuals)
        return x

    def _report(self, residuals):
        bad = residuals > self.tol
        if not bool(bad.any()) or self.on_failure == "ignore":
            return
        message = (f"CG did not reach tol={self.tol:g} for {int(bad.sum())} of "
                   f"{residuals.numel()} rows in max_iter={self.max_iter} iterations (worst "
                   f"relative residual {float(residuals.max()):.3g}; see .last_residuals_). "
                   "Increase max_iter, increase damping (better conditioning), or loosen tol.")
        if self.on_failure == "raise":
            raise ConvergenceError(message)
        warnings.warn(message, stacklevel=4)


def relative_residuals(residual: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``‖r_i‖ / ‖g_i‖`` per row ``[k]`` (0 for a zero right-hand side with a zero residual)."""
    num = residual.norm(dim=1)
    den = rhs.norm(dim=1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), num)


def conjugate_gradients(matvec, rhs: torch.Tensor, max_iter: int, tol: float):
    """Solve ``A x_i = rhs_i`` for rows ``rhs [k, p]`` with independent CG recurrences.

    ``matvec(v [m, p]) -> A v [m, p]`` is called once per iteration on the rows that have not yet
    reached relative residual ``tol``. Returns ``(x [k, p], iterations [k])``. Raises
    :class:`ConvergenceError` if some search direction has ``dᵀ A d ≤ 0`` (A not positive
    definite).
    """
    k = rhs.shape[0]
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    d = r.clone()
    rs = (r * r).sum(dim=1)
    rhs_norm = rhs.norm(dim=1)
    iterations = torch.zeros(k, dtype=torch.long)
    for _ in range(max_iter):
        active = (rs.sqrt() > tol * rhs_norm).nonzero()[:, 0]
        if active.numel() == 0:
            break
        ad = matvec(d[active])
        curv = (d[active] * ad).sum(dim=1)
        if bool((curv <= 0).any()):
            raise ConvergenceError(
                "CG met a direction of non-positive curvature: C + λI is not positive definite "
                "(an indefinite Hessian, or λ = 0 with a singular curvature). Use kind='ggn' or "
                "'fisher', or increase damping.")
        alpha = rs[active] / curv
        x[active] += alpha[:, None] * d[active]
        r[active] -= alpha[:, None] * ad
        rs_new = (r[active] * r[active]).sum(dim=1)
        beta = rs_new / rs[active]
        d[active] = r[active] + beta[:, None] * d[active]
        rs[active] = rs_new
        iterations[active] += 1
    return x, iterations
