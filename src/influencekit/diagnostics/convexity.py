"""Convexity: is the Hessian at θ̂ positive (semi-)definite, and does the GGN stand in for it?

Figures (each a :class:`Finding`):

- ``"min/max Hessian eigenvalue"``: λ_min / λ_max of the Hessian of the mean training objective;
- ``"negative curvature mass"``: Σ|λ_i<0| / Σ|λ_i| (exact from the dense spectrum when it is
  affordable, otherwise estimated by stochastic Lanczos quadrature — the ``how`` field says which);
- ``"Hessian-GGN gap"``: max over queries of ‖(H − G) v‖ / ‖G v‖ for v = (C + λI)⁻¹ g_q, the
  preconditioned query gradients (the directions the scores are taken along).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..curvature import Curvature
from ..func.lanczos import extreme_eigenvalues, spectral_trace
from ..inverse.base import InverseCurvature
from ..runtime import Runtime, resolve_runtime
from ..scoring.influence import Influence
from ..task.target import Target
from .report import Finding, judge_at_most

ASSUMPTION = "convexity"


@dataclass
class Spectrum:
    """Extreme eigenvalues and negative-curvature mass of the Hessian.

    ``exact`` is True when all three numbers come from a dense eigendecomposition.
    """

    min_eigenvalue: float
    max_eigenvalue: float
    negative_mass: float
    exact: bool
    how: str


def hessian_spectrum(target: Target, train, runtime: Runtime | None = None, *,
                     dense_max_params: int = 600, steps: int = 30, probes: int = 8,
                     seed: int = 0) -> Spectrum:
    """Extreme eigenvalues and Σ|λ<0| / Σ|λ| of the Hessian of the mean training objective.

    Exact (dense ``eigh``) when p ≤ ``dense_max_params``; otherwise Lanczos with ``steps``
    Hessian-vector products for the extremes and stochastic Lanczos quadrature with ``probes``
    Rademacher probes (run together, ``steps`` passes over the data) for the mass.
    """
    runtime = resolve_runtime(runtime)
    curvature = Curvature(target, train, kind="hessian")
    p = target.num_params
    if p <= dense_max_params:
        e = torch.linalg.eigvalsh(curvature.dense(runtime))
        mass = float(e.clamp_max(0).abs().sum() / e.abs().sum().clamp_min(1e-300))
        return Spectrum(float(e[0]), float(e[-1]), mass, True, f"exact (dense eigh, p={p})")
    dtype = torch.float64

    def matvec(v):
        return curvature.matvec(v, runtime).to(dtype)
    lo, hi = extreme_eigenvalues(matvec, p, steps, dtype=dtype, device=runtime.device,
                                 seed=seed)
    neg, total = spectral_trace(matvec, p, [lambda x: x.clamp_max(0).abs(), torch.abs],
                                probes=probes, steps=steps, dtype=dtype,
                                device=runtime.device, seed=seed + 1)
    how = (f"estimated (Lanczos {steps} steps for the extremes; stochastic Lanczos quadrature "
           f"{probes} probes x {steps} steps for the mass; p={p})")
    return Spectrum(lo, hi, neg / max(total, 1e-300), False, how)


def eigenvalue_finding(spectrum: Spectrum, damping: float, *, tol: float = 1e-6) -> Finding:
    """λ_min/λ_max: pass if ≥ −tol (PSD up to round-off), warn if λ_min + damping > 0 (the
    damping covers the negative curvature), fail otherwise."""
    ratio = spectrum.min_eigenvalue / max(abs(spectrum.max_eigenvalue), 1e-300)
    rule = (f"pass >= {-tol:g}; warn if lambda_min + damping > 0 (damping {damping:g}); "
            "else fail")
    if ratio >= -tol:
        verdict = "pass"
    elif spectrum.min_eigenvalue + damping > 0:
        verdict = "warn"
    else:
        verdict = "fail"
    return Finding(ASSUMPTION, "min/max Hessian eigenvalue", ratio, verdict, rule, spectrum.how,
                   {"min_eigenvalue": spectrum.min_eigenvalue,
                    "max_eigenvalue": spectrum.max_eigenvalue, "damping": damping})


def negative_mass_finding(spectrum: Spectrum, *, pass_max: float = 1e-3,
                          warn_max: float = 0.05) -> Finding:
    verdict, rule = judge_at_most(spectrum.negative_mass, pass_max, warn_max)
    return Finding(ASSUMPTION, "negative curvature mass", spectrum.negative_mass, verdict, rule,
                   spectrum.how)


def hessian_ggn_gap(target: Target, inverse: InverseCurvature, train, query,
                    runtime: Runtime | None = None) -> dict:
    """Along v = (C + λI)⁻¹ g_q: ``gap [n_query]`` = ‖(H − G) v‖ / ‖G v‖ and the Rayleigh
    quotients ``rayleigh_hessian``, ``rayleigh_ggn`` ``[n_query]`` (vᵀHv, vᵀGv)."""
    runtime = resolve_runtime(runtime)
    v = Influence(target, inverse).precondition(query, runtime)
    hv = Curvature(target, train, kind="hessian").matvec(v, runtime).to(torch.float64)
    gv = Curvature(target, train, kind="ggn").matvec(v, runtime).to(torch.float64)
    v = v.to(torch.float64)
    gap = (hv - gv).norm(dim=1) / gv.norm(dim=1).clamp_min(1e-300)
    return {"gap": gap, "rayleigh_hessian": (v * hv).sum(1), "rayleigh_ggn": (v * gv).sum(1)}


def gap_finding(gap: dict, *, pass_max: float = 0.1, warn_max: float = 0.5) -> Finding:
    value = float(gap["gap"].max())
    verdict, rule = judge_at_most(value, pass_max, warn_max)
    return Finding(ASSUMPTION, "Hessian-GGN gap", value, verdict, rule,
                   "max over queries of ||(H-G)v||/||Gv||, v = preconditioned query gradient",
                   {"gap": gap["gap"].tolist(),
                    "rayleigh_hessian": gap["rayleigh_hessian"].tolist(),
                    "rayleigh_ggn": gap["rayleigh_ggn"].tolist()})


def convexity_findings(target: Target, inverse: InverseCurvature, train, query,
                       runtime: Runtime | None = None, **spectrum_kwargs) -> tuple[
                           list[Finding], Spectrum]:
    """The three convexity findings, and the spectrum (reused by other diagnostics)."""
    spectrum = hessian_spectrum(target, train, runtime, **spectrum_kwargs)
    gap = hessian_ggn_gap(target, inverse, train, query, runtime)
    return [eigenvalue_finding(spectrum, inverse.damping_), negative_mass_finding(spectrum),
            gap_finding(gap)], spectrum
