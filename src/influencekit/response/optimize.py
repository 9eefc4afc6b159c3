"""Full-batch re-optimisation of the weighted training objective (float64).

L(θ, w) = Σ_i w_i ℓ(z_i, θ) / Σ_i w_i + R(θ), minimised from a warm start. Small models
(p ≤ ``newton_max_params``) use Newton's method with the exact Hessian, a Levenberg shift when the
Hessian is not positive definite, and a backtracking line search: it reaches gradient norms near
machine precision, which finite-difference checks of influence need. Larger models use L-BFGS.
This is the "real" answer influence functions are checked against.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import NonFiniteError
from ..grads import as_loader, check_weights, iter_batches, num_examples
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target


@dataclass
class OptimizeResult:
    """``params [p]`` (flat, float64), the final objective and gradient max-norm, iterations,
    and whether the gradient tolerance was reached (None when not judged)."""

    params: torch.Tensor
    objective: float
    grad_norm: float
    iterations: int
    converged: bool | None = None


def minimize(target: Target, data, weights=None, init: torch.Tensor | None = None,
             runtime: Runtime | None = None, *, grad_tol: float = 1e-10,
             max_iter: int = 200, newton_max_params: int = 3000) -> OptimizeResult:
    """Minimise the weighted objective over the Target's parameters; returns flat θ (float64).

    ``init`` (flat ``[p]``) defaults to the Target's current parameters (a warm start). Warns
    when the gradient max-norm does not fall below ``grad_tol``.
    """
    runtime = resolve_runtime(runtime).replace(dtype=torch.float64)
    loader = as_loader(data, runtime, "training data")
    w_all = check_weights(weights, num_examples(loader), runtime)
    cached = [(b, w) for _, b, w in iter_batches(loader, runtime, torch.float64, w_all,
                                                          check=target.batch_validator())]
    start = target.flat_params(torch.float64, runtime.device) if init is None else init
    theta = start.detach().to(dtype=torch.float64, device=runtime.device).clone()

    def objective(flat):
        value = target.objective(target.space.unflatten(flat), cached)
        if not torch.isfinite(value):
            raise NonFiniteError("the training objective is not finite during re-optimisation; "
                                 "check the data, the weights and the regulariser.")
        return value

    if theta.numel() <= newton_max_params:
        from ..curvature.curvature import Curvature
        curvature = Curvature(target, data, kind="hessian", weights=weights)
        theta, iters = _newton(objective, lambda f: curvature.dense(runtime, at=f), theta,
                               grad_tol, max_iter)
    else:
        solution = minimize_function(objective, theta, grad_tol, max_iter)
        theta, iters = solution.params, solution.iterations
    value, grad = _value_and_grad(objective, theta)
    grad_norm = float(grad.abs().max())
    converged = grad_norm <= grad_tol
    if not converged:
        warnings.warn(f"re-optimisation stopped with gradient max-norm {grad_norm:.2e} "
                      f"(> {grad_tol:.0e}) after {iters} iterations; raise max_iter, loosen "
                      "grad_tol or add regularisation.", stacklevel=2)
    return OptimizeResult(theta, float(value), grad_norm, iters, converged)


def _value_and_grad(objective, flat):
    flat = flat.detach().requires_grad_(True)
    value = objective(flat)
    (grad,) = torch.autograd.grad(value, flat)
    return value.detach(), grad


def _newton(objective, hessian_at, theta, grad_tol, max_iter):
    shift, last_norm = 0.0, float("inf")
    for it in range(max_iter):
        value, grad = _value_and_grad(objective, theta)
        norm = float(grad.abs().max())
        if norm <= grad_tol:
            return theta, it
        hess = hessian_at(theta)
        step, shift = _shifted_solve(hess, grad, shift)
        slope = float(grad @ step)
        if slope <= 1e-13 * max(1.0, abs(float(value))):
            # The predicted decrease is below the objective's float64 resolution, so a line
            # search cannot judge the step; take full steps while the gradient still shrinks.
            if norm >= last_norm:
                return theta, it
            theta, last_norm = (theta - step).detach(), norm
            continue
        last_norm = norm
        t = 1.0
        while t > 1e-10:
            candidate = theta - t * step
            if float(objective(candidate)) <= float(value) - 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            return theta, it  # no decrease possible in float64: at the optimum numerically
        theta = candidate.detach()
    return theta, max_iter


def _shifted_solve(hess, grad, shift):
    """Solve (H + μI) s = g with the smallest μ (from the last one, /10) making it PD."""
    eye = torch.eye(hess.shape[0], dtype=hess.dtype, device=hess.device)
    scale = float(hess.diagonal().abs().max().clamp_min(1e-12))
    mu = shift / 10 if shift > 0 else 0.0
    while True:
        chol, info = torch.linalg.cholesky_ex(hess + mu * eye)
        if int(info) == 0:
            return torch.cholesky_solve(grad[:, None], chol)[:, 0], mu
        mu = max(mu * 10, 1e-10 * scale)


def minimize_function(fn, init: torch.Tensor, grad_tol: float, max_iter: int,
           restarts: int = 3, newton_max_params: int = 600) -> OptimizeResult:
    """Minimise a scalar function of a flat vector with L-BFGS (strong Wolfe), restarting the
    history up to ``restarts`` times while the gradient max-norm is above ``grad_tol``.

    L-BFGS stalls near 1e-9 when the objective's changes fall below float64 resolution; for at
    most ``newton_max_params`` parameters it then finishes with Newton steps (dense Hessian,
    taken only while the Hessian is positive definite), which need gradients only."""
    theta = init.detach().clone().requires_grad_(True)
    iterations = 0
    for _ in range(restarts + 1):
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=50,
                                tolerance_grad=grad_tol, tolerance_change=1e-20,
                                line_search_fn="strong_wolfe")

        def closure(opt=opt):
            opt.zero_grad()
            value = fn(theta)
            if not torch.isfinite(value):
                raise NonFiniteError("the objective became non-finite during re-optimisation; "
                                     "raise damping/regularisation or check the data.")
            value.backward()
            return value

        opt.step(closure)
        iterations += int(opt.state[opt._params[0]].get("n_iter", 0))
        with torch.enable_grad():
            value = fn(theta)
            (g,) = torch.autograd.grad(value, theta)
        if float(g.abs().max()) <= grad_tol:
            break
    if float(g.abs().max()) > grad_tol and theta.numel() <= newton_max_params:
        value, g = _newton_polish(fn, theta, grad_tol)
    grad_norm = float(g.abs().max())
    return OptimizeResult(theta.detach(), float(value.detach()), grad_norm, iterations,
                          grad_norm <= grad_tol)


def _newton_polish(fn, theta, grad_tol, steps: int = 4):
    with torch.enable_grad():
        for _ in range(steps):
            hess = torch.autograd.functional.hessian(fn, theta.detach())
            value = fn(theta)
            (g,) = torch.autograd.grad(value, theta)
            if float(g.abs().max()) <= grad_tol:
                break
            try:
                chol = torch.linalg.cholesky(0.5 * (hess + hess.T))
            except torch.linalg.LinAlgError:
                break  # not convex here: keep the L-BFGS answer
            with torch.no_grad():
                theta -= torch.cholesky_solve(g[:, None], chol)[:, 0]
        value = fn(theta)
        (g,) = torch.autograd.grad(value, theta)
    return value, g


def write_params(target: Target, flat: torch.Tensor) -> None:
    """Copy flat θ into the model's selected parameters (the one function that writes them)."""
    named = dict(target.model.named_parameters())
    with torch.no_grad():
        for name, value in target.space.unflatten(flat).items():
            named[name].copy_(value.to(named[name].dtype))
