"""The one mini-batch training loop (retraining, continued training, PBRF, correction, demos).

Training works on a flat parameter vector ``θ [p]`` of the Target (the user's model is never
written here; :func:`~influencekit.response.write_params` does that on request). One optimiser
vocabulary everywhere:

- ``optimizer``: ``"sgd"`` (with ``momentum``), ``"adam"``, or ``"normalized"`` — steps of length
  exactly ``lr``, θ ← θ − lr·∇/‖∇‖, which bounds how far each step moves the model;
- ``lr``: learning rate (step length for ``"normalized"``);
- ``momentum``: SGD momentum (0 = plain SGD).

Batches follow a seeded schedule (:func:`batch_schedule`), so the same seed gives the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import InfluenceKitError
from ..grads import cast_batch, collate, num_examples
from ..runtime import Runtime, resolve_runtime

OPTIMIZERS = ("sgd", "adam", "normalized")

#: ``objective(theta [p], batch, weights [B]) -> scalar`` minimised by each step.
Objective = Callable[[torch.Tensor, object, torch.Tensor], torch.Tensor]


def check_optimizer(optimizer: str) -> str:
    if optimizer not in OPTIMIZERS:
        raise InfluenceKitError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}")
    return optimizer


def make_optimizer(optimizer: str, params: list[torch.Tensor], lr: float,
                   momentum: float = 0.0) -> torch.optim.Optimizer:
    """The torch optimiser for a name of the vocabulary (``"normalized"`` is SGD whose gradient
    :func:`normalize_gradients` rescales before each step)."""
    check_optimizer(optimizer)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=momentum if optimizer == "sgd" else 0.0)


def normalize_gradients(params: list[torch.Tensor]) -> None:
    """Scale the gradients of ``params`` to unit total norm (for ``"normalized"`` steps)."""
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params if p.grad is not None))
    for p in params:
        if p.grad is not None:
            p.grad /= norm.clamp_min(1e-300)


def batch_schedule(n: int, *, batch_size: int | None, seed: int = 0, steps: int | None = None,
                   epochs: int | None = None) -> list[torch.Tensor]:
    """Index batches of a run, from a generator seeded with ``seed``.

    - ``batch_size`` None or ≥ n: the full batch at every step;
    - ``epochs``: a fresh permutation per epoch cut into batches (the last one smaller);
    - ``steps``: that many batches of exactly ``batch_size`` from consecutive permutations.
    """
    if (steps is None) == (epochs is None):
        raise InfluenceKitError("give exactly one of steps= or epochs=")
    if batch_size is None or batch_size >= n:
        return [torch.arange(n)] * (steps if steps is not None else epochs)
    gen = torch.Generator().manual_seed(int(seed))
    if epochs is not None:
        out = []
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            out.extend(order[start:start + batch_size] for start in range(0, n, batch_size))
        return out
    out, order = [], torch.empty(0, dtype=torch.long)
    while len(out) < steps:
        if order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


@dataclass
class TrainResult:
    """``params [p]``: θ after the last step; ``recorded {step: θ [p]}`` at the asked steps;
    ``steps``: steps taken; ``last_objective``: the objective of the last step's batch."""

    params: torch.Tensor
    steps: int
    last_objective: float
    recorded: dict[int, torch.Tensor] = field(default_factory=dict)


def weighted_mean_objective(target) -> Objective:
    """The training objective on one batch: ``Σ_B w_i ℓ_i / Σ_B w_i + R(θ)``."""
    def objective(theta, batch, w):
        return target.objective(target.space.unflatten(theta), [(batch, w)])
    return objective


def train(target, data, schedule: list[torch.Tensor], *, objective: Objective | None = None,
          optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.0, weights=None,
          init: torch.Tensor | None = None, dtype: torch.dtype | None = None,
          record_at=(), stop: Callable[[torch.Tensor], bool] | None = None,
          runtime: Runtime | None = None, desc: str = "training") -> TrainResult:
    """Minimise ``objective`` (default: the weighted-mean training loss + R) over flat θ.

    Args:
        data: the training data (anything the data layer takes); row m of ``weights [n]``
            weighs example m (default ones).
        schedule: index batches, one per step (:func:`batch_schedule`).
        init: start θ ``[p]`` (default: the Target's parameters).
        dtype: training dtype (default: the runtime's, else the parameters').
        record_at: steps after which θ is kept in ``recorded``.
        stop: called with θ after each step; training ends when it returns True.
    """
    runtime = resolve_runtime(runtime)
    if dtype is None:
        dtype = runtime.dtype or next(iter(target.params().values())).dtype
    objective = objective or weighted_mean_objective(target)
    start = target.flat_params(dtype, runtime.device) if init is None else init
    theta = start.detach().to(dtype=dtype, device=runtime.device).clone().requires_grad_(True)
    n = num_examples(data)
    w_all = (torch.ones(n, dtype=dtype) if weights is None
             else torch.as_tensor(weights).to(dtype=dtype))
    opt = make_optimizer(optimizer, [theta], lr, momentum)
    wanted, recorded = set(int(t) for t in record_at), {}
    steps, value = 0, float("nan")
    for idx in runtime.bar(schedule, desc=desc, unit="step"):
        batch = cast_batch(collate(data, idx), dtype, runtime.device)
        opt.zero_grad()
        loss = objective(theta, batch, w_all[idx].to(runtime.device))
        loss.backward()
        if optimizer == "normalized":
            normalize_gradients([theta])
        opt.step()
        steps += 1
        value = float(loss.detach())
        if steps in wanted:
            recorded[steps] = theta.detach().clone()
        if stop is not None and stop(theta.detach()):
            break
    return TrainResult(theta.detach(), steps, value, recorded)
