"""The two demos: the thesis example (exact numbers) and a digits MLP with a picture report.

The digits demo is the shipped ``digits`` config run through the same functions as
``influencekit fit``, ``score`` (and ``eval`` with ``--trust``) and ``report``: its store is
``<out>/store`` and its report ``<out>/index.html``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import conventions
from ..report import RunStore, plot_response_curves, render_report
from ..response import response_curve
from ..runtime import Runtime
from ..testing import solve_thesis, thesis_data, thesis_target
from .config import apply_overrides, load_config, resolve_config
from .main import print_summary
from .pipeline import evaluate_run, fit_run, score_run


def thesis_demo(as_json: bool, echo=print) -> dict:
    """Print the thesis example's θ, ∂θ/∂w and loss influences (JSON or a table)."""
    answer = solve_thesis().to_json()
    if as_json:
        echo(json.dumps(answer))
        return answer
    echo("Thesis example: y = m·x + b, squared error, points (0,0), (1,1.5), (2,2)")
    echo(f"θ = [m, b] = [{answer['theta'][0]:.4f}, {answer['theta'][1]:.4f}]")
    echo("∂θ/∂w per point (∂m, ∂b):")
    for (x, y), row in zip(zip(*thesis_data(), strict=True), answer["param_influence"],
                           strict=True):
        echo(f"  ({float(x):g}, {float(y):g}) -> ({row[0]:+.4f}, {row[1]:+.4f})")
    echo("∂ℓ_col/∂w_row (rows: upweighted point, columns: loss of point):")
    for row in answer["loss_influence"]:
        echo("  " + "  ".join(f"{v:+.4f}" for v in row))
    return answer


def thesis_response_figure(path: Path, runtime: Runtime) -> Path:
    """R(ε) for each thesis point (re-optimised θ) beside its tangent, ε in [−1, 1]."""
    target, data = thesis_target(), thesis_data()
    influence = torch.tensor(solve_thesis().param_influence)
    eps = torch.linspace(-1.0, 1.0, 21, dtype=torch.float64)
    curves = [response_curve(target, data, m, eps, data, parameter_influence=influence[m],
                             runtime=runtime) for m in range(3)]
    return plot_response_curves(curves, path, title="thesis example: θ(ε) and its tangent")


@dataclass
class DigitsDemo:
    """What the digits demo computed. ``scores [n_mis, n_train]``: s = g_qᵀ(G + λI)⁻¹g_m with
    f = the query's cross-entropy under its TRUE label (s > 0: helpful). ``query_index``:
    positions of the misclassified images in the test split (``test image #i``)."""

    scores: torch.Tensor
    query_index: torch.Tensor
    train_accuracy: float
    test_accuracy: float
    n_train: int
    damping: float
    report: Path
    trust: object = None  # the TrustReport when run with trust=True
    store: Path | None = None


THESIS_CAPTION = (
    "Appendix, for readers new to influence functions: what a score is the slope of. On the "
    "thesis' three-point linear regression y = m·x + b (exact answers, see `influencekit demo "
    "thesis`), each panel re-optimises the parameters with one point's weight set to 1 + ε "
    "(solid) beside the first-order prediction θ̂ + ε·∂θ/∂w (dashed). The lines touch at "
    "ε = 0: influence is the slope of this response. The scores above are the same slope for "
    "the digits MLP; its own response curve needs one re-optimisation of all its parameters "
    "per ε (`influencekit eval --store <out>/store --response`).")


def demo_config(n_train: int, hidden: int, epochs: int, l2_strength: float, damping: float,
                max_queries: int, top: int, trust: bool, runtime: Runtime) -> dict:
    """The shipped digits config with the demo's settings."""
    overrides = [("model.args.hidden", hidden), ("model.args.epochs", epochs),
                 ("model.args.l2_strength", l2_strength), ("target.l2_strength", l2_strength),
                 ("data.args.n_train", n_train), ("data.max_queries", max_queries),
                 ("method.damping", damping), ("eval.response_curve", False),
                 ("eval.trust", trust),
                 ("eval.trust_include", ["convexity", "numeric stability"]),
                 ("report.top", max(top, 5)), ("runtime.batch_size", runtime.batch_size),
                 ("runtime.device", str(runtime.device))]
    return resolve_config(apply_overrides(load_config("digits"), overrides))


def digits_demo(out: str | Path = "influence_report", *, n_train: int = 1200, hidden: int = 32,
                epochs: int = 500, l2_strength: float = 1e-3, damping: float = 1e-3,
                top: int = 3, max_queries: int = 10, trust: bool = False,
                runtime: Runtime | None = None, echo=print) -> DigitsDemo:
    """Train a digits MLP, explain its misclassified test images, write a report to ``out``.

    ``trust=True`` also runs the convexity and numeric-stability diagnostics (about a minute
    on 2 CPU cores), prints the TrustReport and adds it to the report."""
    runtime = runtime or Runtime()
    out = Path(out)
    config = demo_config(n_train, hidden, epochs, l2_strength, damping, max_queries, top,
                         trust, runtime)
    store = RunStore(out / "store")
    fitted = fit_run(config, store, runtime.progress, overwrite=True)  # the demo's own folder
    run, inverse = fitted.run, fitted.inverse
    facts = run.facts
    echo(f"digits MLP 64-{hidden}-10 (p = {run.target.num_params:,}): train accuracy "
         f"{facts['train_accuracy']:.3f}, test accuracy {facts['query_accuracy']:.3f}; "
         f"explaining {len(run.query_ids)} misclassified test images")
    echo(f"exact damped Gauss-Newton: (G + λI)⁻¹ with λ = {damping:g}; G (with the L2 term) has "
         "eigenvalues in "
         f"[{inverse.fit_info_['min_eigenvalue']:.2e}, {inverse.fit_info_['max_eigenvalue']:.2e}]")
    scored = score_run(config, store, runtime.progress, run=run, inverse=inverse)
    _print_top(scored.scores, run, top, echo)
    rows = fitted.rows + scored.rows[1:]
    trust_report = None
    if trust:
        checked = evaluate_run(config, store, runtime.progress, run=run, inverse=inverse,
                               scores=scored.scores)
        trust_report = store.trust()
        echo(str(trust_report))
        rows += checked.rows[1:]
    thesis_response_figure(store.figure_path("thesis_response.png"), runtime)
    store.add_figure("thesis_response.png", "The thesis example: a response and its tangent",
                     THESIS_CAPTION)
    page = render_report(store.path, out)
    print_summary(f"influencekit demo -> {out}", rows, echo)
    echo(f"report written to {page}")
    return DigitsDemo(scored.scores, torch.as_tensor(run.query_positions),
                      facts["train_accuracy"], facts["query_accuracy"], n_train, damping, page,
                      trust_report, store.path)


def _print_top(scores, run, top, echo):
    helpful = torch.topk(scores, top, dim=1).indices
    harmful = torch.topk(-scores, top, dim=1).indices
    n = run.facts["n_train"]
    echo("s = g_qᵀ(G + λI)⁻¹g_m for the query's true-label loss: s > 0 helpful (pulls toward the "
         f"true label), s < 0 harmful; Δ = s/n = predicted change of the query's loss (nats) "
         f"when the training image is removed (n = {n}).")
    for q, name in enumerate(run.query_ids):
        echo(f"{name}: label {int(run.query_labels[q])}, predicted "
             f"{int(run.query_predictions[q])}")
        for kind, idx in (("helpful", helpful[q]), ("harmful", harmful[q])):
            items = ", ".join(
                f"{run.train_ids[int(m)]} (y={int(run.train_labels[m])}, "
                f"s={float(scores[q, m]):+.3g}, "
                f"Δ={float(conventions.removal_effect(scores[q, m], n)):+.2e})" for m in idx)
            echo(f"  {kind}: {items}")
