"""Stationarity: is θ̂ a minimiser of the training objective?

Influence functions describe how a MINIMISER of L(θ) = mean loss + R moves when a training
example's weight changes. When training stopped early, ∇L(θ̂) ≠ 0 and the linear response is taken
around a point that is not the one retraining would reach. The figures, all at the Target's
current parameters θ̂ (float64 unless the Runtime sets a dtype):

- ``gradient_norm``: ‖∇L(θ̂)‖ (L2 norm; ∇L is the mean of the training gradients
  g_m = ∇ℓ(z_m) + ∇R of the conventions table);
- ``newton_step``: ‖(C + λI)⁻¹ ∇L(θ̂)‖, the length of the (damped) Newton step: how far θ̂ is
  from the minimiser of the local quadratic model of L. Solved by CG on the curvature of
  ``kind`` (GGN by default, positive semi-definite), or by a fitted ``inverse`` when one is
  given (then λ and C are the inverse's, the metric the scores are computed in);
- ``relative_step``: ``newton_step / ‖θ̂‖``, the figure the verdict is taken on;
- ``top_eigenvalue``: the largest eigenvalue of C (Lanczos), and ``gradient_over_curvature`` =
  ‖∇L‖ / λ_max, a lower bound on the undamped Newton step for a positive semi-definite C;
- ``objective_gap``: ½ ∇Lᵀ (C + λI)⁻¹ ∇L, by how much one Newton step would lower L.

Verdict: pass when ``relative_step <= 1e-3``, warn when ``<= 1e-2``, else fail.

At fit time (:func:`fit_stationarity`, run by ``inverse.fit`` unless ``stationarity=False``)
the same figure is measured cheaply in the metric of the scores: ∇L by one plain forward and
backward pass per batch (no per-example gradients; the curvature's weights), the Newton step by
the just-fitted inverse (no curvature pass, no Lanczos: ``top_eigenvalue`` is NaN). An inverse
that solves with passes over the data (CG, LiSSA: ``inverse.lazy``) is not asked to solve;
for it ``newton_step`` is NaN and the verdict is taken on the bound ‖∇L‖ / λ ≥ ‖(C + λI)⁻¹∇L‖
(C positive semi-definite): pass when the bound is small, else ``"not measured"`` (no warning;
``stationarity(target, train, inverse=inverse)`` measures it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch

from ..curvature import Curvature
from ..errors import NonFiniteError
from ..func.lanczos import extreme_eigenvalues
from ..grads import (
    GradientEngine,
    check_finite,
    iter_gradients,
    regularizer_gradient,
)
from ..inverse import CG, InverseCurvature
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target
from .common import curvature_kind
from .report import Finding, judge_at_most

ASSUMPTION = "training trajectory"
FIGURE = "stationarity (Newton step / ||theta||)"


@dataclass
class Stationarity:
    """The numbers of :func:`stationarity` (see the module docstring), its verdict and a message
    that says how far θ̂ is from a minimiser and what to do."""

    gradient_norm: float
    newton_step: float
    parameter_norm: float
    relative_step: float
    top_eigenvalue: float
    gradient_over_curvature: float
    objective_gap: float
    kind: str
    damping: float
    solver_residual: float
    verdict: str
    rule: str
    message: str

    def finding(self) -> Finding:
        """The same as a :class:`~influencekit.diagnostics.Finding` for a ``TrustReport``."""
        details = {k: v for k, v in asdict(self).items() if k not in ("verdict", "rule")}
        return Finding(ASSUMPTION, FIGURE, self.relative_step, self.verdict, self.rule,
                       f"||(C + damping I)^-1 grad L|| / ||theta|| ({self.kind}, damping "
                       f"{self.damping:.3g})", details)

    def warn(self, stacklevel: int = 2) -> None:
        """Issue the message as a ``UserWarning`` when the verdict is warn or fail."""
        if self.verdict in ("warn", "fail"):
            warnings.warn(self.message, stacklevel=stacklevel + 1)

    def to_json(self) -> dict:
        """The numbers and words as a JSON-safe dict (non-finite numbers become None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def weighted_objective_gradient(curvature: Curvature, runtime: Runtime) -> torch.Tensor:
    """∇L(θ̂) ``[p]`` float64 of the curvature's weighted objective ``Σ w_i ℓ_i / Σ w + R``, by
    one plain backward pass per batch (no per-example gradients)."""
    target = curvature.target
    dtype = runtime.dtype or next(iter(target.params().values())).dtype
    params = {n: p.detach().clone().requires_grad_(True)
              for n, p in target.params(dtype, runtime.device).items()}
    total = torch.zeros(target.num_params, dtype=torch.float64, device=runtime.device)
    weight_sum = 0.0
    for start, batch, w in curvature.batches(runtime, dtype, desc="objective gradient"):
        losses = target.losses(params, batch)
        grads = torch.autograd.grad((w * losses).sum(), list(params.values()),
                                    allow_unused=True)
        filled = {n: torch.zeros_like(p) if g is None else g
                  for (n, p), g in zip(params.items(), grads, strict=True)}
        flat = target.space.flatten(filled).to(torch.float64)
        if not torch.isfinite(flat).all():
            _name_non_finite(target, params, batch, start, runtime)
        total += flat
        weight_sum += float(w.sum())
    total /= weight_sum
    reg = regularizer_gradient(target, {n: p.detach() for n, p in params.items()})
    return total if reg is None else total + reg.to(torch.float64)


def _name_non_finite(target: Target, params, batch, start: int, runtime: Runtime) -> None:
    """Raise :class:`NonFiniteError` naming the first example of ``batch`` whose loss or
    gradient is not finite."""
    engine = GradientEngine(target, runtime.engine)
    values, grads = engine({n: p.detach() for n, p in params.items()}, batch, "loss")
    check_finite(values, target.space.flatten(grads, batch_dims=1), start, "loss")
    raise NonFiniteError(f"the gradient of the training objective over the batch starting at "
                         f"example {start} is not finite although every example's is; compute "
                         "in float64 (Runtime(dtype=torch.float64)).", index=start)


def fit_stationarity(curvature: Curvature, inverse: InverseCurvature,
                     runtime: Runtime | None = None, *, pass_max: float = 1e-3,
                     warn_max: float = 1e-2) -> Stationarity:
    """Stationarity measured at fit time in the fitted ``inverse``'s metric, cheaply: one
    gradient pass over the curvature's data and one solve (module docstring)."""
    runtime = resolve_runtime(runtime)
    grad = weighted_objective_gradient(curvature, runtime)
    theta = curvature.target.flat_params(torch.float64, runtime.device)
    damping = float(inverse.damping_)
    if not getattr(inverse, "lazy", False):
        step = inverse.solve(grad[None].to(runtime.dtype or grad.dtype), runtime)[0]
        return _judge(grad, step.to(torch.float64), theta, math.nan, curvature.kind, damping,
                      math.nan, pass_max, warn_max)
    g, t = float(grad.norm()), float(theta.norm())
    bound = g / damping if damping > 0 else math.inf
    relative = bound / t if t > 0 else math.inf
    rule = f"pass when ||grad L|| / damping <= {pass_max:g} ||theta||, else not measured"
    if relative <= pass_max:
        verdict = "pass"
        message = (f"theta is a minimiser of the training objective to within a Newton step of "
                   f"at most ||grad L|| / damping = {bound:.3g} ({100 * relative:.3g}% of "
                   f"||theta|| = {t:.3g}; gradient norm {g:.3g}).")
    else:
        verdict = "not measured"
        message = (f"stationarity not measured at fit: {type(inverse).__name__} solves with "
                   f"passes over the data; the gradient norm is {g:.3g}, so the Newton step is "
                   f"at most {bound:.3g} ({100 * relative:.3g}% of ||theta|| = {t:.3g}). Measure "
                   "it with ik.diagnostics.stationarity(target, train, inverse=inverse).")
    return Stationarity(g, math.nan, t, relative, math.nan, math.nan, math.nan, curvature.kind,
                        damping, math.nan, verdict, rule, message)


def objective_gradient(target: Target, train, runtime: Runtime) -> torch.Tensor:
    """∇L(θ̂) ``[p]``: the mean of the training gradients g_m = ∇ℓ(z_m) + ∇R."""
    total, count = None, 0
    for _, rows in iter_gradients(target, train, runtime, desc="objective gradient"):
        part = rows.to(torch.float64).sum(dim=0)
        total = part if total is None else total + part
        count += rows.shape[0]
    return total / count


def stationarity(target: Target, train, runtime: Runtime | None = None, *,
                 kind: str = "ggn", damping: float | None = None,
                 inverse: InverseCurvature | None = None, pass_max: float = 1e-3,
                 warn_max: float = 1e-2, lanczos_steps: int = 20, cg_tol: float = 1e-10,
                 cg_max_iter: int = 300) -> Stationarity:
    """How far the Target's parameters θ̂ are from a minimiser of the training objective.

    Args:
        target, train: the model and its training data (as for ``Curvature``).
        kind: curvature kind C of the Newton step (ignored with ``inverse``).
        damping: λ of the Newton step (ignored with ``inverse``); default 1e-6 × λ_max, so that
            a singular curvature still gives a finite step.
        inverse: a fitted inverse: the Newton step is ``inverse.solve(∇L)``, in the metric of the
            scores (its kind and damping).
        pass_max, warn_max: thresholds on ``relative_step``.

    Returns a :class:`Stationarity` (numbers, verdict, message; ``.finding()`` for a report).
    """
    runtime = resolve_runtime(runtime)
    if runtime.dtype is None:
        runtime = runtime.replace(dtype=torch.float64)
    grad = objective_gradient(target, train, runtime)
    if inverse is not None:
        kind, damping = curvature_kind(inverse), inverse.damping_
    curvature = Curvature(target, train, kind=kind)

    def matvec(v):
        return curvature.matvec(v, runtime).to(torch.float64)

    top = extreme_eigenvalues(matvec, target.num_params, steps=lanczos_steps,
                              device=runtime.device)[1]
    if damping is None:
        damping = 1e-6 * max(top, 0.0)
    if inverse is not None:
        step = inverse.solve(grad[None].to(runtime.dtype))[0].to(torch.float64)
    else:
        solver = CG(damping=float(damping), max_iter=cg_max_iter, tol=cg_tol,
                    on_failure="ignore")
        step = solver.fit(curvature, runtime, stationarity=False).solve(grad[None])[0].to(
            torch.float64)
    residual = (matvec(step[None])[0] + damping * step - grad).norm() / grad.norm().clamp_min(
        1e-300)
    theta = target.flat_params(torch.float64)
    return _judge(grad, step, theta, top, kind, float(damping), float(residual), pass_max,
                  warn_max)


def _judge(grad, step, theta, top, kind, damping, residual, pass_max, warn_max) -> Stationarity:
    g, s, t = float(grad.norm()), float(step.norm()), float(theta.norm())
    relative = s / t if t > 0 else (0.0 if s == 0 else math.inf)
    gap = 0.5 * float(grad @ step)
    verdict, rule = judge_at_most(relative, pass_max, warn_max)
    numbers = (f"Newton step ||(C + {damping:.3g} I)^-1 grad L|| = {s:.3g} "
               f"({100 * relative:.3g}% of ||theta|| = {t:.3g}), gradient norm {g:.3g}"
               + (f", largest {kind} eigenvalue {top:.3g}" if math.isfinite(top) else ""))
    if verdict == "pass":
        message = f"theta is a minimiser of the training objective to within its {numbers}."
    else:
        message = (f"theta is not a minimiser of the training objective: a {numbers}; one Newton "
                   f"step would lower the objective by about {gap:.3g}. Influence functions "
                   "assume a minimiser and these scores describe a model that retraining would "
                   "not reproduce: train longer, or polish theta with "
                   "result = ik.minimize(target, train); ik.write_params(target, result.params), "
                   "then fit the inverse again. (inverse.fit(..., stationarity=False) skips "
                   "this check.)")
    if residual > 1e-3:
        message += (f" (The Newton step is approximate: relative residual {residual:.2g}; the "
                    "curvature may be singular, pass damping=.)")
    over = g / top if top > 0 else (math.inf if math.isfinite(top) else math.nan)
    return Stationarity(g, s, t, relative, top, over, gap, kind, damping, residual, verdict,
                        rule, message)
