"""The proximal Bregman response function (PBRF; Bae, Ng, Lo, Ghassemi & Grosse 2022).

What influence functions really estimate for a network that is not at a unique optimum. With
θˢ the current parameters, n training examples, example m whose weight goes from 1 to 1 + ε
(ε = −1 removes it) and λ the ``damping`` of the influence estimate, the PBRF minimises

    P(θ) = (1/n) Σ_i D(h(θ, x_i), h(θˢ, x_i))             # Bregman divergence of the output loss
         + D_R(θ, θˢ)                                      # Bregman divergence of the regulariser
         + (ε/n) · (ℓ(z_m, θ) + R(θ))                       # the perturbation
         + (λ/2) ‖θ − θˢ‖²                                  # proximity

from θˢ. D(y, yˢ) = ℓ(y, t) − ℓ(yˢ, t) − ∇_yℓ(yˢ, t)ᵀ(y − yˢ) is the Bregman divergence of the
Task's loss in the model outputs: for cross-entropy on logits it is KL(softmax(yˢ) ‖ softmax(y))
(the label drops out); for our squared error ℓ = ‖y − t‖² (no ½) it is ‖y − yˢ‖².

Why this perturbation: removing z_m from the weighted-MEAN objective gives, up to the factor
(n − 1)/n, L(θ) + R(θ) − (1/n)(ℓ_m(θ) + R(θ)), i.e. ε = −1 above. Its gradient at θˢ is
(ε/n)·g_m with g_m = ∇ℓ_m + ∇R, the training gradient of the conventions table, and the Hessian
of P at θˢ (at ε → 0) is the damped Gauss-Newton C_GGN + λI of the mean objective. Hence the
first-order (linearised) PBRF is EXACTLY the influence prediction with Exact(GGN, damping=λ):
θ − θˢ ≈ −(ε/n)(C + λI)⁻¹ g_m and Δf ≈ −ε·s/n (+s/n for a removal). ``linearize_loss=True``
replaces ℓ_m + R by its first-order expansion, which for a linear model with squared error makes
P exactly quadratic with that Hessian, so the two agree to rounding.

The four objectives of the gap decomposition share this code (``mode``):
``"loo"`` (the real reweighted objective, warm start), ``"proximal"`` (the real objective plus the
proximity term), ``"pbrf"`` and ``"pbrf_linear"`` (``linearize_loss=True``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..grads import as_loader, cast_batch, collate, iter_batches, num_examples
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target
from .curve import measure
from .optimize import OptimizeResult, minimize_function
from .training import batch_schedule
from .training import train as run_training

MODES = ("loo", "proximal", "pbrf", "pbrf_linear")


def output_bregman(task, outputs, anchor_outputs, targets) -> torch.Tensor:
    """D(y, yˢ) per example ``[B]``: the Bregman divergence of ``task.loss`` in the outputs.

    ``ℓ(y) − ℓ(yˢ) − ∇ℓ(yˢ)ᵀ(y − yˢ)`` with the gradient taken at the anchor outputs yˢ.
    """
    anchor_loss, slope = _anchor_stats(task, anchor_outputs, targets)
    return _bregman(task, outputs, targets, anchor_outputs.detach(), anchor_loss, slope)


def _anchor_stats(task, anchor_outputs, targets):
    anchor = anchor_outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        anchor_loss = task.loss(anchor, targets)
        (slope,) = torch.autograd.grad(anchor_loss.sum(), anchor)
    return anchor_loss.detach(), slope.detach()


def _bregman(task, outputs, targets, anchor_outputs, anchor_loss, slope):
    diff = (outputs - anchor_outputs) * slope
    linear = diff.reshape(diff.shape[0], -1).sum(dim=1)
    return task.loss(outputs, targets) - anchor_loss - linear


class _Objective:
    """P(θ) of one mode over full batches cached in float64 (or one minibatch at a time)."""

    def __init__(self, target, train, index, epsilon, damping, mode, anchor, runtime, dtype):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        self.target, self.mode, self.dtype = target, mode, dtype
        self.epsilon, self.damping = float(epsilon), float(damping)
        self.anchor = anchor.to(dtype)
        self.runtime = runtime
        loader = as_loader(train, runtime, "training data")
        self.n = num_examples(loader)
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} is outside the training data (n = {self.n})")
        self.example = cast_batch(collate(train, [index], runtime, "training data"), dtype,
                                  runtime.device)
        self.anchor_params = target.space.unflatten(self.anchor)
        self._reg_anchor = target.regularization(self.anchor_params).detach()
        self._reg_grad = self._grad_of(lambda p: target.regularization(p))
        self._example_grad = self._grad_of(
            lambda p: target.losses(p, self.example)[0] + target.regularization(p))

    def _grad_of(self, fn):
        theta = self.anchor.clone().requires_grad_(True)
        with torch.enable_grad():
            value = fn(self.target.space.unflatten(theta))
            if not value.requires_grad:
                return torch.zeros_like(self.anchor)
            (g,) = torch.autograd.grad(value, theta)
        return g.detach()

    def anchor_stats(self, batch):
        """(yˢ, targets, ℓ(yˢ), ∇ℓ(yˢ)) of a batch, computed once and reused."""
        with torch.no_grad():
            anchor_out = self.target.outputs(self.anchor_params, batch)
        targets = self.target.targets(batch, anchor_out)
        loss, slope = _anchor_stats(self.target.task, anchor_out, targets)
        return anchor_out, targets, loss, slope

    def data_term(self, params, batch, stats=None) -> torch.Tensor:
        """Σ over the batch of ℓ_i (real modes) or D_i (PBRF modes)."""
        target = self.target
        if self.mode in ("loo", "proximal"):
            return target.losses(params, batch).sum()
        anchor_out, targets, loss, slope = stats or self.anchor_stats(batch)
        outputs = target.outputs(params, batch)
        return _bregman(target.task, outputs, targets, anchor_out, loss, slope).sum()

    def rest(self, theta, params) -> torch.Tensor:
        """Everything but the data term: regulariser part, perturbation, proximity."""
        target, delta = self.target, theta - self.anchor
        if self.mode in ("loo", "proximal"):
            reg = target.regularization(params)
        else:
            reg = (target.regularization(params) - self._reg_anchor
                   - (self._reg_grad * delta).sum())
        if self.mode == "pbrf_linear":
            perturb = (self._example_grad * delta).sum()
        else:
            perturb = target.losses(params, self.example)[0] + target.regularization(params)
        total = reg + (self.epsilon / self.n) * perturb
        if self.mode != "loo":
            total = total + 0.5 * self.damping * (delta * delta).sum()
        return total


def solve_response(target: Target, train, index: int, *, damping: float, epsilon: float = -1.0,
                   mode: str = "pbrf", anchor: torch.Tensor | None = None,
                   runtime: Runtime | None = None, grad_tol: float = 1e-10,
                   max_iter: int = 5000) -> OptimizeResult:
    """Minimise the ``mode`` objective (module doc) with full-batch L-BFGS in float64.

    ``anchor`` θˢ (flat ``[p]``) defaults to the Target's parameters; it is also the start.
    """
    runtime = resolve_runtime(runtime)
    if anchor is None:
        anchor = target.flat_params(torch.float64, runtime.device)
    obj = _Objective(target, train, index, epsilon, damping, mode,
                     anchor.to(torch.float64), runtime, torch.float64)
    loader = as_loader(train, runtime, "training data")
    cached = [b for _, b, _ in iter_batches(loader, runtime, torch.float64,
                                                      check=target.batch_validator())]
    stats = [None if mode in ("loo", "proximal") else obj.anchor_stats(b) for b in cached]

    def value(theta):
        params = target.space.unflatten(theta)
        pairs = zip(cached, stats, strict=True)
        data = sum(obj.data_term(params, b, st) for b, st in pairs) / obj.n
        return data + obj.rest(theta, params)

    return minimize_function(value, obj.anchor, grad_tol, max_iter)


def solve_response_minibatch(target: Target, train, index: int, *, damping: float,
                             epsilon: float = -1.0, mode: str = "pbrf",
                             anchor: torch.Tensor | None = None, epochs: int = 10,
                             lr: float = 1e-3, batch_size: int = 128, seed: int = 0,
                             optimizer: str = "adam", dtype: torch.dtype = torch.float32,
                             runtime: Runtime | None = None) -> OptimizeResult:
    """The same objective minimised on minibatches (large models) by the one training loop
    (:func:`influencekit.response.train`, default Adam).

    Each step uses the unbiased minibatch estimate of the data term (mean over the batch).
    Returns the final parameters (float64); ``objective`` is of the last minibatch and
    ``grad_norm`` is nan (not computed over the full objective).
    """
    runtime = resolve_runtime(runtime)
    if anchor is None:
        anchor = target.flat_params(dtype, runtime.device)
    obj = _Objective(target, train, index, epsilon, damping, mode, anchor, runtime, dtype)

    def objective(theta, batch, w):
        params = target.space.unflatten(theta)
        return obj.data_term(params, batch) / w.numel() + obj.rest(theta, params)

    schedule = batch_schedule(obj.n, batch_size=batch_size, seed=seed, epochs=epochs)
    result = run_training(target, train, schedule, objective=objective, optimizer=optimizer, lr=lr,
                   init=obj.anchor, dtype=dtype, runtime=runtime, desc=f"{mode} (minibatch)")
    return OptimizeResult(result.params.to(torch.float64), result.last_objective,
                          float("nan"), result.steps)


def response_changes(target: Target, train, indices, query, *, damping: float,
                     epsilon: float = -1.0, mode: str = "pbrf", runtime: Runtime | None = None,
                     grad_tol: float = 1e-10, max_iter: int = 5000) -> torch.Tensor:
    """Change of f on the query set for each example's response: ``[n_query, k]``.

    f(θ_mode) − f(θˢ) with θˢ the Target's parameters. With ε = −1 (removal) this is comparable
    with the removal effect +s/n; in general with −ε·s/n.
    """
    runtime = resolve_runtime(runtime)
    anchor = target.flat_params(torch.float64, runtime.device)
    f_anchor = measure(target, anchor, query, runtime)
    out = []
    for m in runtime.bar(list(np.asarray(indices).tolist()), desc=f"{mode} responses"):
        sol = solve_response(target, train, int(m), damping=damping, epsilon=epsilon, mode=mode,
                             anchor=anchor, runtime=runtime, grad_tol=grad_tol,
                             max_iter=max_iter)
        out.append(measure(target, sol.params, query, runtime) - f_anchor)
    return torch.stack(out, dim=1)
