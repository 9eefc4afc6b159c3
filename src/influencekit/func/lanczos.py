"""Lanczos iteration on a symmetric matrix given only by products (pure tensor functions).

Used by ``diagnostics`` for the extreme eigenvalues of the Hessian and for stochastic Lanczos
quadrature (traces of spectral functions). Several independent Lanczos processes run together so
that one call of ``matvec`` (one pass over the data) serves all of them.

Note for the lead: the Arnoldi inverse (branch ``iter``) builds the same Krylov basis; the two can
share this function once merged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LanczosResult:
    """``alphas [k, m]`` and ``betas [k, m - 1]`` of k tridiagonal matrices T (m steps each).

    ``basis [k, m, p]`` holds the orthonormal Krylov vectors (row j of process i is q_j).
    """

    alphas: torch.Tensor
    betas: torch.Tensor
    basis: torch.Tensor

    def tridiagonal(self) -> torch.Tensor:
        """The k matrices T ``[k, m, m]``."""
        k, m = self.alphas.shape
        t = torch.diag_embed(self.alphas)
        if m > 1:
            t = t + torch.diag_embed(self.betas, offset=1) + torch.diag_embed(self.betas,
                                                                              offset=-1)
        return t

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ritz values ``[k, m]`` (ascending) and the squared first components ``[k, m]`` of
        T's eigenvectors (the quadrature weights of stochastic Lanczos quadrature)."""
        values, vectors = torch.linalg.eigh(self.tridiagonal())
        return values, vectors[:, 0, :] ** 2


def lanczos(matvec: MatVec, start: torch.Tensor, steps: int, *,
            breakdown_tol: float = 1e-10) -> LanczosResult:
    """Run ``steps`` Lanczos iterations with full re-orthogonalisation from each row of
    ``start [k, p]`` (normalised inside). ``matvec`` maps ``[k, p]`` to ``[k, p]``.

    On breakdown (a Krylov space exhausted before ``steps``) the remaining steps get β = 0 and a
    fresh random vector orthogonal to the basis, so T stays exact for the found invariant space.
    """
    k, p = start.shape
    steps = min(steps, p)
    q = start / start.norm(dim=1, keepdim=True)
    basis = torch.zeros(k, steps, p, dtype=start.dtype, device=start.device)
    alphas = torch.zeros(k, steps, dtype=start.dtype, device=start.device)
    betas = torch.zeros(k, max(steps - 1, 0), dtype=start.dtype, device=start.device)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    for j in range(steps):
        basis[:, j] = q
        w = matvec(q)
        alphas[:, j] = (w * q).sum(dim=1)
        # Full re-orthogonalisation (twice is enough) against every basis vector so far.
        for _ in range(2):
            coeff = torch.einsum("kjp,kp->kj", basis[:, :j + 1], w)
            w = w - torch.einsum("kj,kjp->kp", coeff, basis[:, :j + 1])
        if j == steps - 1:
            break
        beta = w.norm(dim=1)
        scale = alphas[:, :j + 1].abs().amax(dim=1).clamp_min(1e-300)
        broken = beta <= breakdown_tol * scale
        betas[:, j] = torch.where(broken, torch.zeros_like(beta), beta)
        q = w / beta.clamp_min(1e-300)[:, None]
        if broken.any():
            fresh = torch.randn(k, p, generator=gen, dtype=start.dtype).to(start.device)
            for _ in range(2):
                coeff = torch.einsum("kjp,kp->kj", basis[:, :j + 1], fresh)
                fresh = fresh - torch.einsum("kj,kjp->kp", coeff, basis[:, :j + 1])
            fresh = fresh / fresh.norm(dim=1, keepdim=True)
            q = torch.where(broken[:, None], fresh, q)
    return LanczosResult(alphas, betas, basis)


def extreme_eigenvalues(matvec: MatVec, p: int, steps: int = 30, *, dtype=torch.float64,
                        device="cpu", seed: int = 0) -> tuple[float, float]:
    """Approximate (smallest, largest) eigenvalues of a symmetric ``[p, p]`` operator.

    The extreme Ritz values of one Lanczos run from a random start; exact when ``steps >= p``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.randn(1, p, generator=gen, dtype=dtype).to(device)
    values, _ = lanczos(matvec, start, steps).ritz()
    return float(values[0, 0]), float(values[0, -1])


def spectral_trace(matvec: MatVec, p: int, fns: list[Callable[[torch.Tensor], torch.Tensor]],
                   *, probes: int = 8, steps: int = 30, dtype=torch.float64, device="cpu",
                   seed: int = 0) -> list[float]:
    """Stochastic Lanczos quadrature: estimates of ``tr f(A)`` for each f in ``fns``.

    Rademacher probes z (‖z‖² = p): ``zᵀ f(A) z ≈ p Σ_j τ_j² f(θ_j)`` with Ritz values θ_j and
    weights τ_j², averaged over ``probes`` processes run together.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = (torch.randint(0, 2, (probes, p), generator=gen) * 2 - 1).to(dtype=dtype, device=device)
    values, weights = lanczos(matvec, z, steps).ritz()
    return [float(p * (weights * fn(values)).sum(dim=1).mean()) for fn in fns]
