"""Full-batch re-optimisation of the weighted training objective (small models, float64).

L(θ, w) = Σ_i w_i ℓ(z_i, θ) / Σ_i w_i + R(θ), minimised with L-BFGS (strong Wolfe line search)
from a warm start. This is the "real" answer influence functions are checked against.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import NonFiniteError
from ..grads.data import as_loader, batches, check_weights, num_examples
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target


@dataclass
class OptimizeResult:
    """``params [p]`` (flat, float64), the final objective and gradient norm, and iterations."""

    params: torch.Tensor
    objective: float
    grad_norm: float
    iterations: int
    converged: bool


def minimize(target: Target, data, weights=None, init: torch.Tensor | None = None,
             runtime: Runtime | None = None, *, grad_tol: float = 1e-10,
             max_iter: int = 2000, dtype: torch.dtype = torch.float64) -> OptimizeResult:
    """Minimise the weighted objective over the Target's parameters; returns flat θ.

    ``init`` (flat ``[p]``) defaults to the Target's current parameters (a warm start).
    Warns when the gradient norm does not fall below ``grad_tol``.
    """
    runtime = resolve_runtime(runtime)
    loader = as_loader(data, runtime, "training data")
    w_all = check_weights(weights, num_examples(loader), runtime)
    cached = [(b, w) for _, b, w in batches(loader, runtime, dtype, w_all)]
    space = target.space
    start = target.flat_params(dtype, runtime.device) if init is None else init
    theta = start.detach().to(dtype=dtype, device=runtime.device).clone().requires_grad_(True)

    def objective():
        return target.objective(space.unflatten(theta), cached)

    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=50,
                                  tolerance_grad=grad_tol, tolerance_change=1e-16,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = objective()
        if not torch.isfinite(value):
            raise NonFiniteError("the training objective became non-finite during "
                                 "re-optimisation; check the data and the regulariser.")
        value.backward()
        return value

    optimizer.step(closure)
    value = objective()
    (g,) = torch.autograd.grad(value, theta)
    grad_norm = float(g.abs().max())
    state = optimizer.state[optimizer._params[0]]
    converged = grad_norm <= max(grad_tol * 10, 1e-12)
    if not converged:
        warnings.warn(f"re-optimisation stopped with gradient max-norm {grad_norm:.2e} "
                      f"(> {grad_tol:.0e}) after {state.get('n_iter', 0)} iterations; raise "
                      "max_iter or add damping/regularisation.", stacklevel=2)
    return OptimizeResult(theta.detach(), float(value), grad_norm, int(state.get("n_iter", 0)),
                          converged)


def write_params(target: Target, flat: torch.Tensor) -> None:
    """Copy flat θ into the model's selected parameters (the one function that writes them)."""
    named = dict(target.model.named_parameters())
    with torch.no_grad():
        for name, value in target.space.unflatten(flat).items():
            named[name].copy_(value.to(named[name].dtype))
