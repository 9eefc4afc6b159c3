"""Parameter divergence: does influence predict what continued training really does?

From θ̂ training continues for T steps (T = 1, 2, 4, … up to the end of training) with example m's
weight set to 1 + ε (ε = 1 up-weights, ε = −1 removes), beside a control run with unchanged
weights and the SAME mini-batch sequence. The real change ``θ_T(ε) − θ_T(0)`` and the real change
of the measurement are set against the first-order prediction ``ε ∂θ/∂w_m = −(ε/n)(C + λI)⁻¹ g_m``
and ``g_qᵀ`` of it. Schioppa et al. (2023, arXiv:2305.16971) find that the agreement fades as T
grows in deep networks: this module measures that curve, for single examples
(:func:`parameter_divergence`) and for groups of examples re-weighted together
(:func:`group_divergence`, any number of inverses at once, e.g. one per horizon damping
:func:`horizon_damping`).

Each step minimises the batch's weighted-mean loss ``Σ_B w_i ℓ_i / Σ_B w_i + R(θ)`` (the same
normalisation as the training objective of the conventions table).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InfluenceKitError, ModelMismatchError
from ..evaluation.metrics import pearson, spearman
from ..grads import iter_gradients, num_examples, take
from ..inverse.base import InverseCurvature
from ..response import batch_schedule, check_optimizer, measure, train
from ..runtime import Runtime, resolve_runtime
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
    """Real against predicted changes as the horizon T grows, for M examples or groups.

    Shapes: ``horizons [H]``; ``indices [M]``: the training example (an int) or group of
    examples (a list of ints) re-weighted in each run; ``real_measurement_change [H, M, Q]``
    (f(θ_T(ε)) − f(θ_T(0)) per query); ``predicted_measurement_change [M, Q]`` (g_qᵀ Δθ_pred);
    ``theta_errors [H, M]`` = ‖Δθ_real − Δθ_pred‖/‖Δθ_pred‖ and ``theta_cosines [H, M]`` =
    cos(Δθ_real, Δθ_pred), with Δθ_pred = ε Σ_{m∈group} ∂θ/∂w_m; ``damping``: the λ of the
    inverse that made the prediction. ``real_theta_change [H, M, p]`` and
    ``predicted_theta_change [M, p]`` are kept unless the run was made with
    ``keep_theta=False`` (then None: for models where H·M·p numbers do not fit).
    """

    epsilon: float
    horizons: list[int]
    indices: list
    real_measurement_change: torch.Tensor
    predicted_measurement_change: torch.Tensor
    theta_errors: torch.Tensor
    theta_cosines: torch.Tensor
    damping: float | None = None
    real_theta_change: torch.Tensor | None = None
    predicted_theta_change: torch.Tensor | None = None

    def theta_relative_error(self) -> torch.Tensor:
        """‖Δθ_real − Δθ_pred‖ / ‖Δθ_pred‖, ``[H, M]``."""
        return self.theta_errors

    def theta_cosine(self) -> torch.Tensor:
        """cos(Δθ_real, Δθ_pred), ``[H, M]``."""
        return self.theta_cosines

    def measurement_correlation(self, rank: bool = False) -> list[float]:
        """Pearson (or Spearman) correlation over all (example or group, query) pairs of the
        real and predicted measurement changes, one value per horizon ``[H]``."""
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


def horizon_damping(setup: TrainingSetup, steps: int) -> float:
    """λ_T = 1 / (lr · T): the damping whose influence describes T steps of gradient descent.

    T steps of (full-batch) SGD with learning rate η from θ̂ move θ, to first order in ε, by
    −(ε/n) [I − (I − ηC)^T] C⁻¹ g, whose spectral factor (1 − (1 − ηc)^T)/c is ≈ ηT for
    curvature directions c ≪ 1/(ηT) and ≈ 1/c for c ≫ 1/(ηT): that of (C + λ_T I)⁻¹. A smaller
    damping describes a longer horizon. Defined for ``optimizer="sgd"`` without momentum.
    """
    if setup.optimizer != "sgd" or setup.momentum:
        raise InfluenceKitError(
            f"horizon_damping is defined for plain SGD (optimizer='sgd', momentum=0), got "
            f"optimizer={setup.optimizer!r}, momentum={setup.momentum}")
    if steps < 1:
        raise InfluenceKitError(f"steps must be >= 1, got {steps}")
    return 1.0 / (setup.lr * steps)


def schedule_of(n: int, setup: TrainingSetup) -> list[torch.Tensor]:
    """The index batches of ``setup.steps`` steps (epochs of a seeded permutation)."""
    return batch_schedule(n, batch_size=setup.batch_size, seed=setup.seed, steps=setup.steps)


def visited_examples(n: int, setup: TrainingSetup) -> torch.Tensor:
    """Sorted indices ``[V]`` of the training examples that the ``setup.steps`` batches of
    continued training contain (all n for full-batch steps). Re-weighting an example outside
    them changes nothing: its real change is exactly 0, its relative error exactly 1."""
    return torch.unique(torch.cat(schedule_of(n, setup)))


def unvisited_fix(n: int, setup: TrainingSetup) -> str:
    """What to change so that continued training visits every example (for messages)."""
    needed = -(-n // setup.batch_size) if setup.batch_size else 1
    return (f"continue training for at least {needed} steps (n / batch_size = {n} / "
            f"{setup.batch_size}) or with full-batch steps (batch_size=None), or re-weight "
            f"examples it visits (ik.diagnostics.visited_examples)")


def divergence_examples(scores: torch.Tensor, setup: TrainingSetup,
                        examples: int) -> tuple[list[int], list[int]]:
    """The ``examples`` training examples of largest |score| (``scores [n]``) among those that
    continued training visits, and those of the overall top ``examples`` it never visits
    (passed over: their divergence would be vacuous)."""
    n = scores.numel()
    seen = torch.zeros(n, dtype=torch.bool)
    seen[visited_examples(n, setup)] = True
    order = torch.argsort(scores.abs(), descending=True)
    chosen = order[seen[order]][:examples].tolist()
    passed_over = [m for m in order[:examples].tolist() if not seen[m]]
    return chosen, passed_over


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
    curve = group_divergence(target, [inverse], train, query, [[int(m)] for m in indices],
                             setup, epsilon=epsilon, runtime=runtime)[0]
    curve.indices = [int(m) for m in indices]
    return curve


def group_divergence(target: Target, inverses: Sequence[InverseCurvature], train, query,
                     groups: Sequence[Sequence[int]], setup: TrainingSetup, *,
                     epsilon: float = 1.0, runtime: Runtime | None = None,
                     keep_theta: bool = True) -> list[DivergenceCurve]:
    """Continue training with the weights of each GROUP of examples set to 1 + ε.

    For each group G (a list of training indices) one run of ``setup.steps`` steps re-weights
    all of G at once, beside one control run with unchanged weights (same mini-batches). The
    real changes are set against the first-order prediction of each inverse,
    Δθ_pred = ε Σ_{m∈G} ∂θ/∂w_m = −(ε/n)(C + λI)⁻¹ Σ_{m∈G} g_m, and g_qᵀ Δθ_pred for the
    queries' measurements (influence is additive over a group to first order).

    Args:
        inverses: fitted inverses of this Target's curvature, e.g. the same method at several
            dampings (:func:`horizon_damping`); the training runs are shared by all of them.
        keep_theta: keep ``real_theta_change [H, M, p]`` and ``predicted_theta_change`` in the
            curves (False for large models: only their relative errors and cosines are kept).

    Returns one :class:`DivergenceCurve` per inverse, in order. Cost: (1 + len(groups)) runs.
    """
    runtime = resolve_runtime(runtime)
    groups = [[int(m) for m in group] for group in groups]
    if not groups or any(not group for group in groups):
        raise InfluenceKitError("groups must be a non-empty list of non-empty index lists")
    n = num_examples(train)
    if any(m < 0 or m >= n for group in groups for m in group):
        raise InfluenceKitError(f"a group index is outside the training data (n = {n})")
    for inverse in inverses:
        check_inverse(target, inverse)
    warn_unvisited(groups, n, setup)
    horizons = setup.horizons()
    g_query = torch.cat([g for _, g in iter_gradients(target, query, runtime, of="measurement",
                                                      desc="query gradients")]).double()
    g_groups = torch.stack([group_gradient(target, train, group, runtime) for group in groups])
    pred_theta = [-epsilon * inverse.solve(g_groups, runtime) / inverse.n_train_
                  for inverse in inverses]                                       # each [M, p]
    ones = torch.ones(n, dtype=torch.float64)
    control = continue_training(target, train, ones, setup, horizons, runtime)
    f_control = torch.stack([measure(target, th, query, runtime) for th in control]).double()
    real_f, kept = [], []
    errors = torch.empty(len(inverses), len(horizons), len(groups), dtype=torch.float64)
    cosines = torch.empty_like(errors)
    for j, group in enumerate(groups):
        w = ones.clone()
        w[group] += epsilon
        thetas = continue_training(target, train, w, setup, horizons, runtime)
        real_f.append(torch.stack([measure(target, th, query, runtime) for th in thetas])
                      .double() - f_control)
        change = (thetas - control).double()                                     # [H, p]
        for i, pred in enumerate(pred_theta):
            errors[i, :, j] = ((change - pred[j]).norm(dim=1)
                               / pred[j].norm().clamp_min(1e-300))
            cosines[i, :, j] = torch.nn.functional.cosine_similarity(
                change, pred[j][None].expand_as(change), dim=1)
        if keep_theta:
            kept.append(change)
    real_f = torch.stack(real_f, dim=1)                                          # [H, M, Q]
    return [DivergenceCurve(float(epsilon), horizons, groups, real_f, pred @ g_query.T,
                            errors[i], cosines[i], float(inverse.damping_),
                            torch.stack(kept, dim=1) if keep_theta else None,
                            pred if keep_theta else None)
            for i, (inverse, pred) in enumerate(zip(inverses, pred_theta, strict=True))]


def warn_unvisited(groups: list[list[int]], n: int, setup: TrainingSetup) -> None:
    """Warn about groups none of whose examples the continued training visits (vacuous)."""
    seen = torch.zeros(n, dtype=torch.bool)
    seen[visited_examples(n, setup)] = True
    never = [j for j, group in enumerate(groups) if not seen[group].any()]
    if never:
        warnings.warn(
            f"{len(never)} of {len(groups)} re-weighted examples or groups (positions {never}) "
            f"are in none of the {setup.steps} batches of {setup.batch_size} of continued "
            f"training: re-weighting them changes nothing (real change 0, relative error "
            f"exactly 1). To measure them, {unvisited_fix(n, setup)}.", stacklevel=3)


def group_gradient(target: Target, train, group: list[int], runtime: Runtime) -> torch.Tensor:
    """Σ_{m∈group} g_m ``[p]`` float64 (g_m = ∇ℓ_m + ∇R, as :class:`Influence` scores)."""
    chosen = take(train, group, runtime, "training data")
    return sum(g.double().sum(dim=0) for _, g in iter_gradients(
        target, chosen, runtime, of="loss", desc="group gradients"))


def check_inverse(target: Target, inverse: InverseCurvature) -> None:
    """Refuse an inverse fitted for other parameters, or at other parameter values."""
    inverse.check_fitted()
    if inverse.param_space_ != target.space:
        raise ModelMismatchError("the inverse was fitted for other parameters than this Target "
                                 "selects; fit it on ik.Curvature(target, train).")
    fitted = inverse.fit_info_.get("fingerprint")
    if fitted is not None and fitted != target.fingerprint():
        raise ModelMismatchError("the inverse was fitted at other parameter values than the "
                                 "Target's model has now; fit it again on "
                                 "ik.Curvature(target, train).")


def divergence_finding(curves: list[DivergenceCurve], *, pass_max: float = 0.25,
                       warn_max: float = 1.0, note: str = "") -> Finding:
    """Verdict on the mean ‖Δθ_real − Δθ_pred‖/‖Δθ_pred‖ at the end of training (last horizon),
    over the examples and the ε of ``curves``; ``note`` is appended to how it was measured."""
    last = [float(c.theta_relative_error()[-1].mean()) for c in curves]
    value = nanmean(last)
    verdict, rule = judge_at_most(value, pass_max, warn_max)
    details = {f"epsilon={c.epsilon:g}": c.to_table() for c in curves}
    return Finding(ASSUMPTION, "parameter divergence", value, verdict, rule,
                   f"mean relative error of the parameter change after {curves[0].horizons[-1]} "
                   f"steps of continued training, examples {curves[0].indices}"
                   + (f"; {note}" if note else ""), details)
