"""Parameter divergence: does influence predict what continued training really does?

From θ̂ training continues for T steps (T = 1, 2, 4, … up to the end of training) with example m's
weight set to 1 + ε (ε = 1 up-weights, ε = −1 removes), beside a control run with unchanged
weights and the SAME mini-batch sequence. The real change ``θ_T(ε) − θ_T(0)`` and the real change
of the measurement are set against the first-order prediction ``ε ∂θ/∂w_m = −(ε/n)(C + λI)⁻¹ g_m``
and ``g_qᵀ`` of it. Schioppa et al. (2023, arXiv:2305.16971) find that the agreement fades as T
grows in deep networks: this module measures that curve.

Each step minimises the batch's weighted-mean loss ``Σ_B w_i ℓ_i / Σ_B w_i + R(θ)`` (the same
normalisation as the training objective of the conventions table).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..evaluation.metrics import pearson, spearman
from ..grads import num_examples, take
from ..inverse.base import InverseCurvature
from ..response import batch_schedule, check_optimizer, measure, train
from ..runtime import Runtime, resolve_runtime
from ..scoring.influence import Influence
from ..task.target import Target
from .common import nanmean
from .report import Finding, judge_at_most

ASSUMPTION = "parameter divergence"


@dataclass(frozen=True)
class TrainingSetup:
    """How training continues: ``steps`` (the end of training), ``lr``, ``batch_size`` (None =
    full batch), ``optimizer`` (``"sgd"``, ``"adam"`` or ``"normalized"``: the vocabulary of
    :func:`influencekit.response.train`), ``momentum`` (SGD), ``seed`` (batch order, shared by
    the control and every perturbed run)."""

    steps: int = 64
    lr: float = 0.1
    batch_size: int | None = None
    optimizer: str = "sgd"
    momentum: float = 0.0
    seed: int = 0

    def horizons(self) -> list[int]:
        """1, 2, 4, … below ``steps``, then ``steps``."""
        out, t = [], 1
        while t < self.steps:
            out.append(t)
            t *= 2
        return out + [self.steps]


@dataclass
class DivergenceCurve:
    """Real against predicted changes as the horizon T grows.

    Shapes: ``horizons [H]``, ``indices [M]``, ``real_theta_change [H, M, p]``,
    ``predicted_theta_change [M, p]`` (= ε ∂θ/∂w_m), ``real_measurement_change [H, M, Q]``
    (f(θ_T(ε)) − f(θ_T(0)) per query), ``predicted_measurement_change [M, Q]`` (g_qᵀ ε ∂θ/∂w_m).
    """

    epsilon: float
    horizons: list[int]
    indices: list[int]
    real_theta_change: torch.Tensor
    predicted_theta_change: torch.Tensor
    real_measurement_change: torch.Tensor
    predicted_measurement_change: torch.Tensor

    def theta_relative_error(self) -> torch.Tensor:
        """‖Δθ_real − Δθ_pred‖ / ‖Δθ_pred‖, ``[H, M]``."""
        diff = self.real_theta_change - self.predicted_theta_change[None]
        return diff.norm(dim=2) / self.predicted_theta_change.norm(dim=1).clamp_min(1e-300)

    def theta_cosine(self) -> torch.Tensor:
        """cos(Δθ_real, Δθ_pred), ``[H, M]``."""
        return torch.nn.functional.cosine_similarity(
            self.real_theta_change, self.predicted_theta_change[None].expand_as(
                self.real_theta_change), dim=2)

    def measurement_correlation(self, rank: bool = False) -> list[float]:
        """Pearson (or Spearman) correlation over all (example, query) pairs of the real and
        predicted measurement changes, one value per horizon ``[H]``."""
        fn = spearman if rank else pearson
        pred = self.predicted_measurement_change.flatten()
        return [fn(self.real_measurement_change[h].flatten(), pred)
                for h in range(len(self.horizons))]

    def to_table(self) -> list[dict]:
        """One dict per horizon: T, mean θ relative error, mean cosine, Pearson, Spearman."""
        err, cos = self.theta_relative_error(), self.theta_cosine()
        rho, r = self.measurement_correlation(rank=True), self.measurement_correlation()
        return [{"T": t, "theta_relative_error": float(err[h].mean()),
                 "theta_cosine": float(cos[h].mean()), "pearson": r[h], "spearman": rho[h]}
                for h, t in enumerate(self.horizons)]


def schedule_of(n: int, setup: TrainingSetup) -> list[torch.Tensor]:
    """The index batches of ``setup.steps`` steps (epochs of a seeded permutation)."""
    return batch_schedule(n, batch_size=setup.batch_size, seed=setup.seed, steps=setup.steps)


def continue_training(target: Target, train_data, weights: torch.Tensor, setup: TrainingSetup,
                      record_at: list[int], runtime: Runtime | None = None,
                      init: torch.Tensor | None = None) -> torch.Tensor:
    """Train flat θ (from ``init`` or the Target's parameters; the model is not written) with
    per-example ``weights [n]``; returns θ after each step count in ``record_at``:
    ``[len(record_at), p]``."""
    runtime = resolve_runtime(runtime)
    check_optimizer(setup.optimizer)
    result = train(target, train_data, schedule_of(weights.numel(), setup),
                   optimizer=setup.optimizer, lr=setup.lr, momentum=setup.momentum,
                   weights=weights, init=init, record_at=record_at,
                   runtime=runtime.replace(progress=False))
    return torch.stack([result.recorded[t] for t in record_at])


def parameter_divergence(target: Target, inverse: InverseCurvature, train, query,
                         indices: list[int], setup: TrainingSetup, *, epsilon: float = 1.0,
                         runtime: Runtime | None = None) -> DivergenceCurve:
    """Continue training with each example of ``indices`` re-weighted by 1 + ε; see module doc.

    Cost: (1 + len(indices)) runs of ``setup.steps`` steps.
    """
    runtime = resolve_runtime(runtime)
    n = num_examples(train)
    horizons = setup.horizons()
    ones = torch.ones(n, dtype=torch.float64)
    control = continue_training(target, train, ones, setup, horizons, runtime)
    f_control = torch.stack([measure(target, th, query, runtime) for th in control])
    real_theta, real_f = [], []
    for m in indices:
        w = ones.clone()
        w[m] += epsilon
        thetas = continue_training(target, train, w, setup, horizons, runtime)
        real_theta.append(thetas - control)
        real_f.append(torch.stack([measure(target, th, query, runtime) for th in thetas])
                      - f_control)
    chosen = take(train, list(indices), runtime, "training data")
    scorer = Influence(target, inverse)
    pred_theta = epsilon * scorer.parameter_influence(chosen, runtime).to(torch.float64)
    g_query = scorer.query_gradients(query, runtime).to(torch.float64)
    return DivergenceCurve(float(epsilon), horizons, list(indices),
                           torch.stack(real_theta, dim=1).to(torch.float64), pred_theta,
                           torch.stack(real_f, dim=1).to(torch.float64), pred_theta @ g_query.T)


def divergence_finding(curves: list[DivergenceCurve], *, pass_max: float = 0.25,
                       warn_max: float = 1.0) -> Finding:
    """Verdict on the mean ‖Δθ_real − Δθ_pred‖/‖Δθ_pred‖ at the end of training (last horizon),
    over the examples and the ε of ``curves``."""
    last = [float(c.theta_relative_error()[-1].mean()) for c in curves]
    value = nanmean(last)
    verdict, rule = judge_at_most(value, pass_max, warn_max)
    details = {f"epsilon={c.epsilon:g}": c.to_table() for c in curves}
    return Finding(ASSUMPTION, "parameter divergence", value, verdict, rule,
                   f"mean relative error of the parameter change after {curves[0].horizons[-1]} "
                   f"steps of continued training, examples {curves[0].indices}", details)
