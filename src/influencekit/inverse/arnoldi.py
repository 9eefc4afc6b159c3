"""Arnoldi: the top eigenpairs of C from a Krylov subspace (Schioppa et al. 2022, 2112.03052)."""

from __future__ import annotations

import warnings

import torch

from ..errors import InfluenceKitError
from .base import InverseCurvature

COMPLEMENTS = ("drop", "damping")
PROBE_CHUNK = 32  # probe vectors per pass over the data


class Arnoldi(InverseCurvature):
    """``(C + λI)⁻¹`` restricted to the top-``rank`` eigenspace of C found by Arnoldi iteration.

    ``fit`` runs ``n_iter`` Arnoldi steps (for a symmetric C this is Lanczos with full
    re-orthogonalisation; a breakdown — an invariant subspace found — restarts from a fresh random
    vector orthogonal to the basis), each step ONE curvature-vector product (a pass over the
    data). The Ritz pairs of the Krylov basis give eigenpairs ``C ≈ V diag(e) Vᵀ``; the ``rank``
    of largest magnitude are kept (``eigenvalues_ [rank]``, ``eigenvectors_ [rank, p]``, float64).

    Solving: with ``P = VᵀV`` the projection on the kept eigenspace,

    - ``complement="drop"`` (default, as in Schioppa et al.): ``x = V diag(1/(e+λ)) Vᵀ g``; the
      part of g outside the kept eigenspace is DROPPED (scores only see the top directions);
    - ``complement="damping"``: the rest is treated as curvature zero,
      ``x = V diag(1/(e+λ)) Vᵀ g + (g − Vᵀ V g)/λ`` (needs λ > 0); exact when rank(C) ≤ ``rank``.

    With ``rank = n_iter = p`` both equal :class:`Exact` up to rounding.

    Args:
        damping: λ ≥ 0 in ``(C + λI)⁻¹``.
        rank: number of eigenpairs kept (≤ p).
        n_iter: Krylov steps (≥ rank, ≤ p); default ``min(p, max(2·rank, rank + 20))``.
        complement: ``"drop"`` or ``"damping"`` (above).
        trace_probes: for the share of the spectrum kept. The trace of C is computed EXACTLY
            (products with the p unit vectors, one pass) when p ≤ ``trace_probes``, else estimated
            with ``trace_probes`` Rademacher probes (Hutchinson; one pass).
        seed: seed of the start vector and the probes.

    ``fit_info_`` adds ``rank``, ``n_iter``, ``restarts``, ``kept_min_eigenvalue``,
    ``kept_max_eigenvalue``, ``trace``, ``trace_method`` ("exact" / "hutchinson"),
    ``trace_std_error`` and ``spectrum_kept`` = Σ kept eigenvalues / trace(C).
    """

    def __init__(self, damping: float = 0.0, rank: int = 20, n_iter: int | None = None,
                 complement: str = "drop", trace_probes: int = 64, seed: int = 0):
        self.damping = damping
        self.rank = rank
        self.n_iter = n_iter
        self.complement = complement
        self.trace_probes = trace_probes
        self.seed = seed

    def _check(self, p: int) -> int:
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if self.complement not in COMPLEMENTS:
            raise ValueError(f"complement={self.complement!r} is not one of {COMPLEMENTS}")
        if self.complement == "damping" and not self.damping > 0:
            raise ValueError("complement='damping' inverts the rest of the spectrum as 1/λ and "
                             "needs damping > 0; set damping or use complement='drop'.")
        if not 1 <= self.rank <= p:
            raise ValueError(f"rank must be in [1, p = {p}], got {self.rank}")
        n_iter = self.n_iter if self.n_iter is not None else min(p, max(2 * self.rank,
                                                                        self.rank + 20))
        if not self.rank <= n_iter <= p:
            raise ValueError(f"n_iter must be in [rank = {self.rank}, p = {p}], got {n_iter}")
        return n_iter

    def _fit(self, curvature, runtime):
        p = curvature.target.num_params
        n_iter = self._check(p)
        generator = torch.Generator().manual_seed(self.seed)

        def matvec(v):
            return curvature.matvec(v, runtime).to(torch.float64).cpu()

        values, vectors, restarts = arnoldi_eigenpairs(matvec, p, n_iter, generator)
        top = values.abs().argsort(descending=True)[: self.rank]
        top = top[values[top].argsort(descending=True)]
        self.eigenvalues_ = values[top].contiguous()
        self.eigenvectors_ = vectors[top].contiguous()
        trace, method, std_error = estimate_trace(matvec, p, self.trace_probes, generator)
        kept = float(self.eigenvalues_.sum())
        self.fit_info_.update(
            rank=self.rank, n_iter=n_iter, restarts=restarts,
            kept_min_eigenvalue=float(self.eigenvalues_.min()),
            kept_max_eigenvalue=float(self.eigenvalues_.max()),
            trace=trace, trace_method=method, trace_std_error=std_error,
            spectrum_kept=kept / trace if trace != 0 else float("nan"))
        self._warn_if_not_positive()

    def _warn_if_not_positive(self):
        shifted = self.eigenvalues_ + self.damping
        scale = float(self.eigenvalues_.abs().max().clamp_min(1e-300))
        if bool((shifted.abs() <= 1e-12 * scale).any()):
            raise InfluenceKitError(
                f"a kept eigenvalue of C + λI is zero (λ = {self.damping}); increase damping or "
                "lower rank.")
        if bool((shifted < 0).any()):
            warnings.warn(f"{int((shifted < 0).sum())} kept eigenvalues of C + λI are negative "
                          "(non-convex curvature): scores may have the wrong sign. Use "
                          "kind='ggn' or more damping.", stacklevel=3)

    def _solve(self, grads, runtime=None):
        v = self.eigenvectors_
        g = grads.to(torch.float64).to(v.device)
        coeff = g @ v.T
        x = (coeff / (self.eigenvalues_ + self.damping)) @ v
        if self.complement == "damping":
            x = x + (g - coeff @ v) / self.damping
        return x

    def _state_names(self):
        return ["eigenvalues_", "eigenvectors_"]


def arnoldi_eigenpairs(matvec, p: int, n_iter: int, generator: torch.Generator):
    """Ritz pairs of a symmetric operator from ``n_iter`` Arnoldi steps.

    ``matvec(v [1, p]) -> [1, p]`` float64. Returns ``(values [n_iter], vectors [n_iter, p],
    restarts)``, values ascending. Full re-orthogonalisation (two Gram-Schmidt passes); on
    breakdown (‖w‖ tiny: an invariant subspace) the next basis vector is a fresh random vector
    orthogonal to the basis, so ``n_iter = p`` always yields a complete basis.
    """
    basis = torch.zeros(n_iter, p, dtype=torch.float64)
    hess = torch.zeros(n_iter, n_iter, dtype=torch.float64)
    basis[0] = _unit(torch.randn(p, dtype=torch.float64, generator=generator))
    restarts, norm_scale = 0, 0.0
    for j in range(n_iter):
        w = matvec(basis[j][None])[0]
        norm_scale = max(norm_scale, float(w.norm()))
        for _ in range(2):
            h = basis[: j + 1] @ w
            w = w - h @ basis[: j + 1]
            hess[: j + 1, j] += h
        if j + 1 == n_iter:
            break
        beta = float(w.norm())
        if beta > 1e-10 * max(norm_scale, 1e-300):
            hess[j + 1, j] = beta
            basis[j + 1] = w / beta
        else:
            basis[j + 1] = _fresh_orthogonal(basis[: j + 1], p, generator)
            restarts += 1
    ritz = 0.5 * (hess + hess.T)
    values, small = torch.linalg.eigh(ritz)
    return values, small.T @ basis, restarts


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def _fresh_orthogonal(basis, p, generator):
    for _ in range(10):
        v = torch.randn(p, dtype=torch.float64, generator=generator)
        for _ in range(2):
            v = v - (basis @ v) @ basis
        if float(v.norm()) > 1e-8:
            return _unit(v)
    raise InfluenceKitError("Arnoldi could not find a new direction orthogonal to its basis; "
                            "lower n_iter.")


def estimate_trace(matvec, p: int, probes: int, generator: torch.Generator):
    """``(trace, method, std_error)`` of the operator: exact if p ≤ probes, else Hutchinson."""
    if p <= probes:
        eye = torch.eye(p, dtype=torch.float64)
        return float(torch.diagonal(matvec(eye)).sum()), "exact", 0.0
    z = torch.randint(0, 2, (probes, p), generator=generator).to(torch.float64) * 2 - 1
    samples = torch.cat([(chunk * matvec(chunk)).sum(dim=1) for chunk in z.split(PROBE_CHUNK)])
    std_error = float(samples.std() / probes**0.5) if probes > 1 else float("nan")
    return float(samples.mean()), "hutchinson", std_error
