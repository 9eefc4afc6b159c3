"""``check``: every diagnostic with cheap defaults, collected in one TrustReport."""

from __future__ import annotations

import logging
import time

import torch

from ..inverse.base import InverseCurvature
from ..inverse.exact import Exact
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target
from .common import scores
from .convexity import convexity_findings
from .cost import estimate_seconds, format_seconds, measure_unit_costs
from .divergence import (
    TrainingSetup,
    divergence_examples,
    divergence_finding,
    parameter_divergence,
    unvisited_fix,
)
from .linearity import linearity_errors, linearity_finding
from .report import Finding, TrustReport, skipped
from .stability import damping_sensitivity, method_agreement, residual_finding, solver_residuals
from .trajectory import checkpoint_agreement

ALL = ("convexity", "numeric stability", "training trajectory", "parameter divergence",
       "first-order expansion")

log = logging.getLogger(__name__)


def estimate_check_seconds(target: Target, inverse: InverseCurvature, train, query,
                           runtime: Runtime | None = None, *,
                           checkpoints: list[torch.Tensor] | None = None,
                           training: TrainingSetup | None = None, examples: int = 2,
                           epsilons=(-1.0, 1.0), dense_max_params: int = 600,
                           lanczos_steps: int = 30, include=ALL) -> dict[str, float]:
    """Estimated seconds of each check :func:`check` would run with these arguments (rough, a
    factor of a few; measured unit costs, see :mod:`influencekit.diagnostics.cost`)."""
    from ..grads import as_loader, num_examples

    runtime = resolve_runtime(runtime)
    costs = measure_unit_costs(target, train, runtime)
    n_query = num_examples(as_loader(query, runtime, "query data"))
    batch = training.batch_size if training is not None else None
    step_fraction = 1.0 if batch is None else batch / num_examples(
        as_loader(train, runtime, "training data"))
    return estimate_seconds(
        costs, num_params=target.num_params, n_query=n_query, include=include,
        examples=examples, epsilons=epsilons, checkpoints=len(checkpoints or []),
        training_steps=training.steps if training is not None else 64,
        step_fraction=step_fraction, dense_max_params=dense_max_params, lanczos_steps=lanczos_steps,
        lazy_inverse=bool(getattr(inverse, "lazy", False)))


class _Clock:
    """Logs each assumption's estimate before it runs and its duration after."""

    def __init__(self, estimates: dict[str, float]):
        self.estimates, self.seconds = estimates, {}

    def start(self, assumption: str) -> None:
        log.info("checking %s: about %s (estimate)", assumption,
                 format_seconds(self.estimates.get(assumption, 0.0)))
        self._name, self._start = assumption, time.perf_counter()

    def stop(self) -> None:
        seconds = time.perf_counter() - self._start
        self.seconds[self._name] = seconds
        log.info("checked %s in %s", self._name, format_seconds(seconds))


def check(target: Target, inverse: InverseCurvature, train, query,
          runtime: Runtime | None = None, *, other: InverseCurvature | None = None,
          checkpoints: list[torch.Tensor] | None = None, training: TrainingSetup | None = None,
          examples: int = 2, epsilons=(-1.0, 1.0), top_k: int = 10,
          dense_max_params: int = 600, lanczos_steps: int = 30,
          include=ALL) -> TrustReport:
    """How far the influence scores of ``inverse`` on ``query`` can be trusted.

    Args:
        target, inverse, train, query: as for ``Influence(target, inverse).pairwise``; the
            Target's parameters are taken to be the trained θ̂.
        other: a second fitted inverse for "method agreement"; by default an ``Exact`` inverse
            with the same damping and curvature kind when the dense curvature has at most
            ``dense_max_params`` parameters and ``inverse`` is not already Exact (else skipped).
        checkpoints: flat parameter vectors ``[p]`` of earlier checkpoints ("training
            trajectory"; skipped when None).
        training: how training continues for "parameter divergence"; default full-batch SGD
            with lr = 1 / λ_max(Hessian) for 64 steps.
        examples: how many training examples (those with the largest |score| for the first
            query) the divergence and linearity checks re-train for. The divergence check
            takes them among the examples its mini-batches visit (an example never visited
            would give a vacuous relative error of exactly 1); the examples it passes over are
            named in the finding's ``how`` and the report's context keeps
            ``"divergence_examples"``.
        epsilons: weight changes 1 + ε for the linearity check (−1 = removal); the divergence
            check uses ε = +1 and ε = −1.
        include: which assumptions to check (names in ``ALL``).

    Cost on a small model: two dense Hessians at most (or ~2·``lanczos_steps`` passes), two
    refits for damping sensitivity, (1 + 2·examples) runs of continued training and
    ``examples`` × (1 + len(epsilons)) full-batch re-optimisations (by far the dearest on an
    MLP). Before it starts, the estimated seconds of each check are logged (logger
    ``influencekit.diagnostics.check``, level INFO; :func:`estimate_check_seconds` returns them
    without running anything); the report's ``context`` keeps ``estimated_seconds`` and the
    measured ``seconds`` per assumption.
    """
    runtime = resolve_runtime(runtime)
    unknown = set(include) - set(ALL)
    if unknown:
        raise ValueError(f"include has unknown assumptions {sorted(unknown)}; choose from {ALL}")
    estimates = estimate_check_seconds(
        target, inverse, train, query, runtime, checkpoints=checkpoints, training=training,
        examples=examples, epsilons=epsilons, dense_max_params=dense_max_params,
        lanczos_steps=lanczos_steps, include=[a for a in ALL if a in include])
    log.info("trust checks: about %s in all (%s)", format_seconds(sum(estimates.values())),
             ", ".join(f"{a} {format_seconds(s)}" for a, s in estimates.items()))
    clock = _Clock(estimates)
    findings: list[Finding] = []
    spectrum = None
    if "convexity" in include:
        clock.start("convexity")
        found, spectrum = convexity_findings(target, inverse, train, query, runtime,
                                             dense_max_params=dense_max_params,
                                             steps=lanczos_steps)
        findings += found
        clock.stop()
    if "numeric stability" in include:
        clock.start("numeric stability")
        findings.append(residual_finding(solver_residuals(target, inverse, train, query,
                                                          runtime)))
        other = _default_other(inverse, target, train, runtime, dense_max_params, other)
        if other is None:
            findings.append(skipped("numeric stability", "method agreement",
                                    "pass other=<a second fitted inverse> to measure it"))
        else:
            findings.append(method_agreement(target, inverse, other, train, query, runtime))
        findings.append(damping_sensitivity(target, inverse, train, query, runtime, k=top_k))
        clock.stop()
    if "training trajectory" in include:
        clock.start("training trajectory")
        if checkpoints:
            findings.append(checkpoint_agreement(target, inverse, train, query, checkpoints,
                                                 runtime, k=top_k))
        else:
            findings.append(skipped("training trajectory", "checkpoint agreement",
                                    "pass checkpoints=[flat params, ...] to measure it"))
        clock.stop()
    chosen: list[int] = []
    divergence_chosen: list[int] = []
    if {"parameter divergence", "first-order expansion"} & set(include):
        first = scores(target, inverse, train, query, runtime)[0]
        chosen = torch.topk(first.abs(), min(examples, first.numel())).indices.tolist()
    if "parameter divergence" in include:
        clock.start("parameter divergence")
        if training is None:
            if spectrum is None:
                from .convexity import hessian_spectrum
                spectrum = hessian_spectrum(target, train, runtime,
                                            dense_max_params=dense_max_params,
                                            steps=lanczos_steps)
            training = TrainingSetup(steps=64, lr=1.0 / max(spectrum.max_eigenvalue, 1e-12))
        divergence_chosen, passed_over = divergence_examples(first, training, examples)
        note = "" if not passed_over else (
            f"examples {passed_over} of larger |score| are in none of the {training.steps} "
            f"batches of {training.batch_size} and were passed over (re-weighting them would "
            f"change nothing); to measure them, {unvisited_fix(first.numel(), training)}")
        curves = [parameter_divergence(target, inverse, train, query, divergence_chosen,
                                       training, epsilon=e, runtime=runtime)
                  for e in (1.0, -1.0)]
        findings.append(divergence_finding(curves, note=note))
        clock.stop()
    if "first-order expansion" in include:
        clock.start("first-order expansion")
        errors = linearity_errors(target, inverse, train, query, chosen, epsilons, runtime)
        findings.append(linearity_finding(errors, chosen, epsilons))
        clock.stop()
    context = {"inverse": inverse.get_config(), "kind": inverse.fit_info_["kind"],
               "damping": inverse.damping_, "num_params": target.num_params,
               "examples": chosen, "divergence_examples": divergence_chosen,
               "estimated_seconds": estimates,
               "seconds": clock.seconds}
    return TrustReport(findings, context)


def _default_other(inverse, target, train, runtime, dense_max_params, other):
    if other is not None:
        return other
    if isinstance(inverse, Exact) or target.num_params > dense_max_params:
        return None
    from ..curvature import Curvature
    return Exact(damping=inverse.damping_).fit(
        Curvature(target, train, kind=inverse.fit_info_["kind"]), runtime, stationarity=False)
