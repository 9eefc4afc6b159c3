"""The two demos: the thesis example (exact numbers) and a digits MLP with a picture report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import conventions
from ..curvature import Curvature
from ..data import load_digits_split
from ..inverse import Exact
from ..report import plot_response_curves, render_examples_report, top_examples
from ..response import batch_schedule, response_curve, train, write_params
from ..runtime import Runtime
from ..scoring import Influence
from ..storage import save_tensors
from ..task import ClassificationTask, L2Regularizer, Target
from ..testing import solve_thesis, thesis_data, thesis_target


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
    f = the query's cross-entropy under its TRUE label (s > 0: helpful)."""

    scores: torch.Tensor
    query_index: torch.Tensor
    train_accuracy: float
    test_accuracy: float
    n_train: int
    damping: float
    report: Path
    trust: object = None  # the TrustReport when run with trust=True


def train_mlp(x, y, hidden: int, l2_strength: float, epochs: int, runtime: Runtime,
              seed: int = 0) -> nn.Module:
    """Full-batch Adam (lr 0.01, float64) on mean cross-entropy + (l2_strength/2)‖θ‖², through
    the library's training loop; returns the trained model."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.Tanh(),
                          nn.Linear(hidden, int(y.max()) + 1)).double()
    target = Target(model, ClassificationTask(), regularizer=L2Regularizer(l2_strength))
    schedule = batch_schedule(len(y), batch_size=None, epochs=epochs)
    result = train(target, (x, y), schedule, optimizer="adam", lr=0.01, runtime=runtime,
                   desc="training MLP")
    write_params(target, result.params)
    return model


def digits_demo(out: str | Path = "influence_report", *, n_train: int = 1200, hidden: int = 32,
                epochs: int = 500, l2_strength: float = 1e-3, damping: float = 1e-3,
                top: int = 3, max_queries: int = 10, trust: bool = False,
                runtime: Runtime | None = None, echo=print) -> DigitsDemo:
    """Train a digits MLP, explain its misclassified test images, write a report to ``out``.

    ``trust=True`` also runs the convexity and numeric-stability diagnostics (about a minute
    on 2 CPU cores), prints the TrustReport and adds it to the report."""
    runtime = runtime or Runtime()
    out = Path(out)
    split = load_digits_split(n_train=n_train)
    model = train_mlp(split.x_train, split.y_train, hidden, l2_strength, epochs, runtime)
    with torch.no_grad():
        train_acc = float((model(split.x_train).argmax(1) == split.y_train).double().mean())
        pred = model(split.x_test).argmax(1)
    wrong = (pred != split.y_test).nonzero()[:, 0][:max_queries]
    test_acc = float((pred == split.y_test).double().mean())
    target = Target(model, ClassificationTask(measurement="loss"),
                    regularizer=L2Regularizer(l2_strength))
    echo(f"digits MLP 64-{hidden}-10 (p = {target.num_params:,}): train accuracy "
         f"{train_acc:.3f}, test accuracy {test_acc:.3f}; explaining {len(wrong)} misclassified "
         "test images")
    train = (split.x_train, split.y_train)
    query = (split.x_test[wrong], split.y_test[wrong])
    inverse = Exact(damping=damping).fit(Curvature(target, train, kind="ggn"), runtime)
    echo(f"exact damped Gauss-Newton: (G + λI)⁻¹ with λ = {damping:g}; G (with the L2 term) has "
         "eigenvalues in "
         f"[{inverse.fit_info_['min_eigenvalue']:.2e}, {inverse.fit_info_['max_eigenvalue']:.2e}]")
    scores = Influence(target, inverse).pairwise(query, train, runtime)
    _print_top(scores, query, pred[wrong], wrong, split, top, echo)
    store = out / "store"
    save_tensors(store, {"scores": scores, "query_x": query[0], "query_y": query[1],
                         "query_pred": pred[wrong], "train_x": split.x_train,
                         "train_y": split.y_train, "query_index": wrong},
                 {"kind": "examples", "image_shape": list(split.image_shape),
                  "n_train": n_train, "measurement": "cross-entropy of the true label",
                  "title": "Why did the digits MLP get these test images wrong?",
                  "notes": _units_note(damping, n_train),
                  "figures": [["Thesis example: response R(ε) beside its tangent",
                               "thesis_response.png"]]})
    thesis_response_figure(out / "thesis_response.png", runtime)
    trust_html, trust_report = "", None
    if trust:
        from ..diagnostics import check

        trust_report = check(target, inverse, train, query, runtime,
                             include=("convexity", "numeric stability"))
        echo(str(trust_report))
        trust_html = "<h2>How far to trust these scores</h2>" + trust_report.to_html()
    page = render_examples_report(store, out, k=5, max_queries=max_queries,
                                  extra_html=trust_html)
    echo(f"report written to {page}")
    return DigitsDemo(scores, wrong, train_acc, test_acc, n_train, damping, page, trust_report)


def _units_note(damping, n):
    return (f"score s = g_qᵀ (G + λI)⁻¹ g_m with G the Gauss-Newton matrix of the mean training "
            f"loss (plus the L2 term), λ = {damping:g}, f = cross-entropy of the query's true "
            f"label. s > 0: the training example is helpful (upweighting it lowers the query's "
            f"loss, pulling toward the true label); s < 0: harmful. Removing it changes the "
            f"query's loss by about +s/n nats (n = {n}).")


def _print_top(scores, query, predicted, wrong, split, top, echo):
    helpful, harmful = top_examples(scores.numpy(), top)
    n = split.x_train.shape[0]
    echo("s = g_qᵀ(G + λI)⁻¹g_m for the query's true-label loss: s > 0 helpful (pulls toward the "
         f"true label), s < 0 harmful; Δ = s/n = predicted change of the query's loss (nats) "
         f"when the training image is removed (n = {n}).")
    for q in range(len(wrong)):
        echo(f"test image #{int(wrong[q])}: label {int(query[1][q])}, predicted "
             f"{int(predicted[q])}")
        for name, idx in (("helpful", helpful[q]), ("harmful", harmful[q])):
            items = ", ".join(
                f"#{m} (y={int(split.y_train[m])}, s={float(scores[q, m]):+.3g}, "
                f"Δ={float(conventions.removal_effect(scores[q, m], n)):+.2e})" for m in idx)
            echo(f"  {name}: {items}")
