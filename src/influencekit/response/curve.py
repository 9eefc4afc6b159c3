"""What really happens when a training example's weight changes, beside the first-order guess.

For example m and a grid of ε, the weights are w = 1 except w_m = 1 + ε; the weighted objective is
re-optimised warm-started from θ̂. ε = −1 is leave-one-out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grads import as_loader, gradients, iter_batches, num_examples, take
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target
from .optimize import minimize


@dataclass
class ResponseCurve:
    """Real and first-order responses to example ``index``'s weight 1 + ε.

    Shapes: ``epsilons [k]``, ``theta [k, p]`` (re-optimised), ``predicted_theta [k, p]``
    (θ̂ + ε ∂θ/∂w_m), ``measurement [k, n_query]`` (f at the re-optimised θ),
    ``predicted_measurement [k, n_query]`` (f(θ̂) + ε ∂f/∂w_m), ``theta_hat [p]``,
    ``measurement_hat [n_query]``.
    """

    index: int
    epsilons: torch.Tensor
    theta: torch.Tensor
    predicted_theta: torch.Tensor
    measurement: torch.Tensor
    predicted_measurement: torch.Tensor
    theta_hat: torch.Tensor
    measurement_hat: torch.Tensor

    def linearity_error(self) -> torch.Tensor:
        """|real − predicted| change of the measurement, relative to the real change, ``[k]``."""
        real = self.measurement - self.measurement_hat
        pred = self.predicted_measurement - self.measurement_hat
        return (real - pred).norm(dim=1) / real.norm(dim=1).clamp_min(1e-300)


def measure(target: Target, flat: torch.Tensor, query, runtime: Runtime) -> torch.Tensor:
    """f at flat θ for every query example, ``[n_query]``."""
    params = target.space.unflatten(flat.to(runtime.device))
    loader = as_loader(query, runtime, "query data")
    out = []
    with torch.no_grad():
        for _, batch, _ in iter_batches(loader, runtime, flat.dtype,
                                        check=target.batch_validator()):
            out.append(target.measurements(params, batch))
    return torch.cat(out)


def response_curve(target: Target, train, index: int, epsilons, query, *,
                   weights=None, parameter_influence: torch.Tensor | None = None,
                   inverse=None, runtime: Runtime | None = None,
                   grad_tol: float = 1e-10) -> ResponseCurve:
    """Re-optimise for each ε and return the real response beside its tangent.

    The tangent needs ∂θ/∂w_m ``[p]``: pass it as ``parameter_influence`` or pass a fitted
    ``inverse`` (whose damping then enters the prediction). ``weights [n]`` are the base
    weights (default ones; example ``index`` gets ``weights[index] + ε``). The Target's
    parameters must be the optimum θ̂ of the objective with the base weights.
    """
    runtime = resolve_runtime(runtime)
    n = num_examples(as_loader(train, runtime, "training data"))
    if not 0 <= index < n:
        raise IndexError(f"index {index} is outside the training data (n = {n})")
    theta_hat = target.flat_params(torch.float64, runtime.device)
    if parameter_influence is None:
        if inverse is None:
            raise ValueError("pass parameter_influence=[p] or a fitted inverse=")
        from ..scoring.influence import Influence
        one = take(train, [index], runtime, "training data")
        parameter_influence = Influence(target, inverse).parameter_influence(one, runtime)[0]
    dtheta = parameter_influence.to(torch.float64)
    eps = torch.as_tensor(epsilons, dtype=torch.float64)
    f_hat = measure(target, theta_hat, query, runtime)
    g_query = gradients(target, query, runtime.replace(dtype=torch.float64),
                        of="measurement")
    df = g_query @ dtheta
    thetas, values = [], []
    base = (torch.ones(n, dtype=torch.float64) if weights is None
            else torch.as_tensor(weights, dtype=torch.float64))
    for e in runtime.bar(eps.tolist(), desc=f"response of example {index}"):
        w = base.clone()
        w[index] += e
        result = minimize(target, train, weights=w, init=theta_hat, runtime=runtime,
                          grad_tol=grad_tol)
        thetas.append(result.params)
        values.append(measure(target, result.params, query, runtime))
    return ResponseCurve(index, eps, torch.stack(thetas), theta_hat + eps[:, None] * dtheta,
                         torch.stack(values), f_hat + eps[:, None] * df, theta_hat, f_hat)


def leave_one_out(target: Target, train, indices, query, *, runtime: Runtime | None = None,
                  warm_start: bool = True, grad_tol: float = 1e-10) -> torch.Tensor:
    """Real change of f when each example is removed and the model re-optimised.

    Returns ``[n_query, len(indices)]``: f(θ̂₋ₘ) − f(θ̂), comparable with the removal effect +s/n.
    ``warm_start=False`` restarts from zeros (a convex model's optimum does not depend on it).
    """
    runtime = resolve_runtime(runtime)
    n = num_examples(as_loader(train, runtime, "training data"))
    theta_hat = target.flat_params(torch.float64, runtime.device)
    f_hat = measure(target, theta_hat, query, runtime)
    init = theta_hat if warm_start else torch.zeros_like(theta_hat)
    changes = []
    for m in runtime.bar(list(indices), desc="leave-one-out"):
        w = torch.ones(n, dtype=torch.float64)
        w[m] = 0.0
        result = minimize(target, train, weights=w, init=init, runtime=runtime,
                          grad_tol=grad_tol)
        changes.append(measure(target, result.params, query, runtime) - f_hat)
    return torch.stack(changes, dim=1)
