"""How long each diagnostic will take, estimated before it runs.

Two unit costs are measured on the user's model and the first batch of its data, and scaled to
the whole training set (each takes a fraction of a second):
``objective`` (one loss + gradient of the mean training objective over all the training data)
and ``gradients`` (one pass of per-example training gradients). A dense p x p curvature is
taken to cost about p objective passes (measured within a factor of ~2 on MLPs with p from 460
to 2,410), one Newton step of a re-optimisation one dense Hessian, one L-BFGS iteration one
objective pass, and one step of continued training three (forward, backward, update). The
estimates are rough (a factor of a few): they say whether a check takes seconds, minutes or
hours, not the second it ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..grads import as_loader, gradients
from ..runtime import Runtime

NEWTON_MAX_PARAMS = 3000  # response.minimize switches from Newton to L-BFGS above this
NEWTON_STEPS = 20  # typical Newton steps of a warm-started re-optimisation (non-convex: more)
LBFGS_STEPS = 200
LANCZOS_PROBES = 8


@dataclass(frozen=True)
class UnitCosts:
    """Seconds of one objective pass (loss + gradient over all the training data) and of one
    pass of per-example gradients, measured on this model, data and Runtime."""

    objective: float
    gradients: float


def measure_unit_costs(target, train, runtime: Runtime) -> UnitCosts:
    """Time one objective pass (the fastest of three, so warm-up and noise are excluded) and
    one pass of per-example gradients, on the first batch only, scaled by n / batch size (the
    estimate never costs a pass over a large data set)."""
    from ..grads import iter_batches, num_examples

    quiet = runtime.replace(progress=False)
    dtype = runtime.dtype or torch.float64
    loader = as_loader(train, quiet, "training data")
    _, batch, weights = next(iter(iter_batches(loader, quiet, dtype)))
    scale = num_examples(loader) / len(weights)
    flat = target.flat_params(dtype, runtime.device).requires_grad_(True)
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        value = target.objective(target.space.unflatten(flat), [(batch, weights)])
        torch.autograd.grad(value, flat)
        seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    gradients(target, batch, quiet, of="loss")
    return UnitCosts(min(seconds) * scale, (time.perf_counter() - start) * scale)


def estimate_seconds(costs: UnitCosts, *, num_params: int, n_query: int, include,
                     examples: int = 2, epsilons=(-1.0, 1.0), checkpoints: int = 0,
                     training_steps: int = 64, step_fraction: float = 1.0,
                     dense_max_params: int = 600, lanczos_steps: int = 30,
                     lazy_inverse: bool = False) -> dict[str, float]:
    """Estimated seconds of each assumption's check in ``include`` (see the module doc).

    ``step_fraction``: the share of the training data one continued-training step sees
    (``batch_size / n`` for mini-batches, 1 for full batch).
    ``lazy_inverse``: the inverse solves with curvature products (CG, LiSSA), so each solve costs
    about 2 · 100 objective passes instead of a dense fit."""
    p, obj = num_params, costs.objective
    dense = p * obj
    fit = 2 * 100 * obj * n_query if lazy_inverse else dense
    out = {}
    for assumption in include:
        if assumption == "convexity":
            if p <= dense_max_params:
                seconds = 2 * dense + 4 * n_query * obj
            else:
                seconds = lanczos_steps * 2 * obj * (2 + LANCZOS_PROBES) + 4 * n_query * obj
        elif assumption == "numeric stability":
            seconds = 3 * fit + 3 * costs.gradients + 2 * n_query * obj
        elif assumption == "training trajectory":
            seconds = checkpoints * (fit + costs.gradients)
        elif assumption == "parameter divergence":
            step = 3 * obj * min(1.0, step_fraction)
            seconds = (1 + 2 * examples) * training_steps * step + costs.gradients
        elif assumption == "first-order expansion":
            step = NEWTON_STEPS * (dense + obj) if p <= NEWTON_MAX_PARAMS else LBFGS_STEPS * obj
            seconds = examples * (1 + len(epsilons)) * step + costs.gradients
        else:
            raise ValueError(f"unknown assumption {assumption!r}")
        out[assumption] = float(seconds)
    return out


def format_seconds(seconds: float) -> str:
    """``"0.4 s"``, ``"12 s"``, ``"3.5 min"``, ``"2.1 h"``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
