"""Attribution quality against real retraining (issue 4).

Suites:
  quick  (< 10 min on 2 idle cores): MNIST logistic regression (LOO Pearson, LDS), scikit-learn
         digits MLP (PBRF Pearson, LDS with warm-start retraining), MNIST 10% label flips
         (mislabel AUC), removal curves on the MNIST logistic regression.
  full   : more removals and subsets, cold-start LDS for the MLP, an MNIST MLP, and the gap
         decomposition on the digits MLP.
  mlp    : the MLP parts of "full" at quick sizes (digits MLP + decomposition, MNIST MLP).
  peers  : the digits MLP alone; with the optional ``bench`` extra (kronfluence, dattri) it adds
           kronfluence_ekfac / kronfluence_kfac / dattri_trak rows and our Exact / KFAC / EKFAC
           with loss-only training gradients (``*_lossgrad``) in the same harness.
  removal: removal curves alone (rows task="mnist_removal" with k, mean_change, stderr).

    PYTHONPATH=src python benchmarks/attribution_quality.py --suite quick --json

prints a JSON list of rows {task, method, loo_pearson, lds, lds_stderr, pbrf_pearson,
mislabel_auc, seconds} (null where not measured). Methods beyond Exact / Identity / TracIn / TRAK
(CG, LiSSA, Arnoldi, KFAC, EKFAC) are included when their classes exist in this checkout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import influencekit as ik
from influencekit.evaluation import (
    flip_labels,
    lds,
    loo_correlation,
    mislabel_detection,
    sample_subsets,
)
from influencekit.grads.projection import RandomProjection
from influencekit.inverse import REGISTRY
from influencekit.response.pbrf import response_changes
from influencekit.response.retrain import LBFGSRetrainer, leave_one_out_retrained, subset_retraining
from influencekit.scoring import TRAK, TracIn

RUNTIME = ik.Runtime(dtype=torch.float64, batch_size=500, progress=False)
OPTIONAL = ("CG", "LiSSA", "Arnoldi", "KFAC", "EKFAC")


def optional_settings(exact, p) -> dict:
    """Settings of the optional methods. LiSSA's step size is set from the largest eigenvalue
    that Exact found (a convergent scale; its depth and minibatch keep the quick suite quick)."""
    top = float(exact.eigenvalues_[-1]) + exact.damping
    return {"CG": dict(max_iter=min(500, p), tol=1e-10),
            "LiSSA": dict(scale=1.2 * top, n_iter=200, minibatch_size=512),
            "Arnoldi": dict(rank=min(100, p)),
            "KFAC": {}, "EKFAC": {}}

SUITES = {
    "quick": dict(loo_k=40, lds_subsets=30, mlp_pbrf_k=12, mlp_lds_subsets=20,
                  mlp_cold=False, mnist_mlp=False, decomposition=False,
                  removal_queries=20, removal_ks=(10, 50, 100)),
    "full": dict(loo_k=120, lds_subsets=100, mlp_pbrf_k=40, mlp_lds_subsets=50,
                 mlp_cold=True, mnist_mlp=True, decomposition=True,
                 removal_queries=50, removal_ks=(10, 50, 100, 200)),
    # The MLP parts of "full" at quick sizes: gap decomposition on digits and the MNIST MLP.
    "mlp": dict(loo_k=0, lds_subsets=0, mlp_pbrf_k=12, mlp_lds_subsets=20, mlp_cold=False,
                mnist_mlp=True, decomposition=True, skip_linear=True),
    # The digits MLP alone at quick sizes: our methods beside kronfluence (when installed).
    "peers": dict(loo_k=0, lds_subsets=0, mlp_pbrf_k=12, mlp_lds_subsets=20, mlp_cold=False,
                  mnist_mlp=False, decomposition=False, skip_linear=True),
    # Removal curves on the MNIST logistic regression (Exact, Identity, random-k).
    "removal": dict(removal_only=True, removal_queries=20, removal_ks=(10, 50, 100),
                    mnist_mlp=False),
}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# -- models and training ----------------------------------------------------------------------
def train_target(model, train, l2, seed_init=None, grad_tol=1e-9, max_iter=5000):
    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(l2))
    result = LBFGSRetrainer(grad_tol=grad_tol, max_iter=max_iter).retrain(
        target, train, np.arange(len(train[1])), init=seed_init, runtime=RUNTIME)
    ik.write_params(target, result)
    return target


def sgd_checkpoints(target, train, epochs=4, lr=0.05, batch_size=64, seed=0):
    """A short SGD run from zeros (the library's training loop): (checkpoints at the end of
    each epoch, learning rates) for TracIn."""
    n = len(train[1])
    per_epoch = -(-n // batch_size)
    schedule = ik.response.batch_schedule(n, batch_size=batch_size, seed=seed, epochs=epochs)
    run = ik.response.train(target, train, schedule, optimizer="sgd", lr=lr,
                            init=torch.zeros(target.num_params, dtype=torch.float64),
                            record_at=[per_epoch * (e + 1) for e in range(epochs)],
                            runtime=RUNTIME)
    ckpts = [run.recorded[step] for step in sorted(run.recorded)]
    return ckpts, [lr] * len(ckpts)


def mlp(d_in, hidden, classes, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(),
                         nn.Linear(hidden, classes)).to(torch.float64)


# -- scores of every method -----------------------------------------------------------------
def method_scores(target, train, query, damping, *, tracin=True, trak=True, kind="ggn"):
    """{method: (scores [n_query, n_train], n)} on the s scale of the conventions table."""
    out = {}
    curvature = ik.Curvature(target, train, kind=kind)
    n = len(train[1])
    t0 = time.time()
    exact = ik.Exact(damping=damping).fit(curvature, RUNTIME)
    out["Exact"] = (ik.Influence(target, exact).pairwise(query, train, RUNTIME), time.time() - t0)
    settings = optional_settings(exact, target.num_params)
    for name in OPTIONAL:
        if name not in REGISTRY:
            continue
        t0 = time.time()
        try:
            inverse = REGISTRY[name](damping=damping, **settings[name]).fit(curvature, RUNTIME)
            out[name] = (ik.Influence(target, inverse).pairwise(query, train, RUNTIME),
                         time.time() - t0)
        except Exception as exc:  # report, do not hide: the row says why it is missing
            log(f"  {name} failed: {type(exc).__name__}: {exc}")
    # Identity: gradient similarity g_qᵀ g_m (no curvature; the baseline of the issue).
    t0 = time.time()
    identity = ik.Identity(damping=0.0).fit(curvature, RUNTIME)
    out["Identity"] = (ik.Influence(target, identity).pairwise(query, train, RUNTIME),
                       time.time() - t0)
    if tracin:
        t0 = time.time()
        ckpts, lrs = sgd_checkpoints(target, train)
        out["TracIn"] = (TracIn(target, ckpts + [target.flat_params(torch.float64)],
                                lrs + [lrs[-1]]).pairwise(query, train, RUNTIME),
                         time.time() - t0)
    if trak:
        t0 = time.time()
        proj = RandomProjection(min(512, target.num_params), "rademacher", seed=0)
        out["TRAK"] = (TRAK(target, projection=proj, damping=damping).pairwise(
            query, train, RUNTIME), time.time() - t0)
    del n
    return out


def peer_scores(model, train, query, damping_factor) -> dict:
    """kronfluence's EK-FAC and K-FAC scores and dattri's TRAK scores of the same trained model
    (float64), when the optional ``bench`` extra is installed:
    {"kronfluence_ekfac": (scores [n_query, n_train], seconds), ...}.
    ``damping_factor = λ + l2`` (see benchmarks/_kronfluence.py for the mapping)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _kronfluence
    out = {}
    if not _kronfluence.available():
        log("  kronfluence is not installed (pip install 'influencekit[bench]'): its rows are "
            "skipped")
    for strategy in ("ekfac", "kfac") if _kronfluence.available() else ():
        try:
            out[f"kronfluence_{strategy}"] = _kronfluence.pairwise(
                model, train, query, strategy, damping_factor)
        except Exception as exc:  # report, do not hide
            log(f"  kronfluence_{strategy} failed: {type(exc).__name__}: {exc}")
    import _dattri
    if not _dattri.available():
        log("  dattri is not installed: its TRAK row is skipped")
        return out
    try:  # one checkpoint, 512 projections: the same budget as our TRAK row
        out["dattri_trak"] = _dattri.trak_pairwise(model, train, query, proj_dim=512)
    except Exception as exc:
        log(f"  dattri_trak failed: {type(exc).__name__}: {exc}")
    return out


def lossgrad_scores(target, train, query, damping, methods) -> dict:
    """{"<name>[_sampled]_lossgrad": (scores, seconds)} for ``methods`` = ((name, kwargs), ...):
    g_qᵀ(C+λI)⁻¹∇ℓ_m, i.e. our scores without the ∇R part of the training gradient (a per-query
    constant), as kronfluence computes them; ``_sampled`` = one sampled label per example for
    the K-FAC factors, as kronfluence's true-Fisher mode does."""
    out = {}
    curvature = ik.Curvature(target, train, kind="ggn")
    for name, kwargs in methods:
        if name not in REGISTRY:
            continue
        t0 = time.time()
        inverse = REGISTRY[name](damping=damping, **kwargs).fit(curvature, RUNTIME)
        sc = ik.Influence(target, inverse, include_regularizer=False)
        label = f"{name}_sampled" if kwargs.get("labels") == "sampled" else name
        out[f"{label}_lossgrad"] = (sc.pairwise(query, train, RUNTIME), time.time() - t0)
    return out


def row(task, method, **values):
    base = {"task": task, "method": method, "loo_pearson": None, "lds": None,
            "lds_stderr": None, "pbrf_pearson": None, "mislabel_auc": None, "seconds": None}
    base.update(values)
    return base


# -- tasks --------------------------------------------------------------------------------------
def mnist_logistic(cfg, rows):
    from influencekit.data.mnist import mnist_split
    log("MNIST logistic regression (PCA-50, 4500 train / 500 query)")
    train, query = mnist_split(4500, 500, dims=50)
    model = nn.Linear(50, 10).to(torch.float64)
    target = train_target(model, train, l2=1e-3, grad_tol=1e-10,
                          seed_init=torch.zeros(510, dtype=torch.float64))
    n = len(train[1])
    scores = method_scores(target, train, query, damping=0.0)
    rng = np.random.default_rng(0)
    removed = rng.choice(n, size=cfg["loo_k"], replace=False)
    t0 = time.time()
    real = leave_one_out_retrained(target, train, removed, query, LBFGSRetrainer(grad_tol=1e-10),
                                   reference=target.flat_params(torch.float64), runtime=RUNTIME)
    log(f"  LOO retraining of {len(removed)} examples: {time.time() - t0:.0f}s")
    masks = sample_subsets(n, 0.5, cfg["lds_subsets"], seed=0)
    t0 = time.time()
    outputs = subset_retraining(target, train, masks, query, LBFGSRetrainer(grad_tol=1e-8),
                                runtime=RUNTIME)
    log(f"  LDS retraining of {len(masks)} subsets: {time.time() - t0:.0f}s")
    for name, (s, secs) in scores.items():
        loo = loo_correlation(s[:, removed].numpy() / n, real.numpy())
        res = lds(s.numpy(), masks, outputs)
        rows.append(row("mnist_logreg", name, loo_pearson=loo["pearson"], lds=res.mean,
                        lds_stderr=res.stderr, seconds=secs))
        log(f"  {name:9s} LOO pearson {loo['pearson']:.3f}  LDS {res.mean:.3f}±{res.stderr:.3f}")


def mlp_task(task, train, query, cfg, rows, hidden, damping, l2):
    d, n = train[0].shape[1], len(train[1])
    model = mlp(d, hidden, 10, seed=0)
    theta0 = ik.Target(model, ik.ClassificationTask()).flat_params(torch.float64)
    target = train_target(model, train, l2=l2, seed_init=theta0, grad_tol=1e-8)
    scores = method_scores(target, train, query, damping=damping)
    peers = peer_scores(model, train, query, damping + l2)
    if peers:  # our K-FAC family and Exact with kronfluence's loss-only training gradients
        scores.update(lossgrad_scores(target, train, query, damping, (
            ("Exact", {}), ("KFAC", {}), ("EKFAC", {}),
            ("KFAC", {"labels": "sampled"}), ("EKFAC", {"labels": "sampled"}))))
    scores.update(peers)
    rng = np.random.default_rng(1)
    removed = rng.choice(n, size=cfg["mlp_pbrf_k"], replace=False)
    t0 = time.time()
    pbrf = response_changes(target, train, removed, query, damping=damping, mode="pbrf",
                            runtime=RUNTIME, grad_tol=1e-9)
    log(f"  PBRF for {len(removed)} examples: {time.time() - t0:.0f}s")
    masks = sample_subsets(n, 0.5, cfg["mlp_lds_subsets"], seed=0)
    t0 = time.time()
    init = theta0 if cfg["mlp_cold"] else None
    outputs = subset_retraining(target, train, masks, query, LBFGSRetrainer(grad_tol=1e-7,
                                                                            max_iter=3000),
                                init=init, runtime=RUNTIME)
    log(f"  LDS retraining ({'cold' if init is not None else 'warm'} start) of {len(masks)} "
        f"subsets: {time.time() - t0:.0f}s")
    for name, (s, secs) in scores.items():
        pr = loo_correlation(s[:, removed].numpy() / n, pbrf.numpy())["pearson"]
        res = lds(s.numpy(), masks, outputs)
        rows.append(row(task, name, pbrf_pearson=pr, lds=res.mean, lds_stderr=res.stderr,
                        seconds=secs))
        log(f"  {name:9s} PBRF pearson {pr:.3f}  LDS {res.mean:.3f}±{res.stderr:.3f}")
    return target, removed


def digits_mlp(cfg, rows):
    from sklearn.datasets import load_digits
    log("scikit-learn digits MLP (64-32-10 tanh)")
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    tr, qu = order[:1400], order[1400:1600]
    train = (torch.tensor(x[tr]), torch.tensor(y[tr]))
    query = (torch.tensor(x[qu]), torch.tensor(y[qu]))
    target, removed = mlp_task("digits_mlp", train, query, cfg, rows, 32, 1e-2, 1e-3)
    if cfg["decomposition"]:
        from influencekit.evaluation.decomposition import gap_decomposition
        theta0 = ik.Target(mlp(64, 32, 10, seed=0), ik.ClassificationTask()).flat_params(
            torch.float64)
        out = gap_decomposition(target, train, removed[:10], query, damping=1e-2,
                                cold_retrainer=LBFGSRetrainer(grad_tol=1e-8), cold_init=theta0,
                                runtime=RUNTIME)
        log("  gap decomposition (Pearson vs previous step / vs cold-start LOO):")
        for r in out["table"]:
            log(f"    {r['step']:16s} {r['pearson_vs_previous']}  {r['pearson_vs_first']:.3f}")
        rows.append({"task": "digits_mlp_decomposition", "method": "Exact",
                     "table": out["table"]})


def mnist_mlp(cfg, rows):
    from influencekit.data.mnist import mnist_split
    log("MNIST MLP (PCA-50, 50-32-10 tanh)")
    train, query = mnist_split(4500, 500, dims=50)
    mlp_task("mnist_mlp", train, query, cfg, rows, 32, 1e-2, 1e-3)


def mnist_mislabel(cfg, rows):
    from influencekit.data.mnist import mnist_split
    log("MNIST logistic regression, 10% labels flipped")
    train, _ = mnist_split(4500, 500, dims=50)
    labels, flipped = flip_labels(train[1].numpy(), 0.1, 10, seed=0)
    train = (train[0], torch.tensor(labels))
    target = train_target(nn.Linear(50, 10).to(torch.float64), train, l2=1e-3,
                          seed_init=torch.zeros(510, dtype=torch.float64))
    t0 = time.time()
    exact = ik.Exact(damping=0.0).fit(ik.Curvature(target, train, kind="ggn"), RUNTIME)
    sc = ik.Influence(target, exact)
    candidates = {"Exact": (sc.self_influence(train, RUNTIME), time.time() - t0)}
    t0 = time.time()
    identity = ik.Identity(damping=0.0).fit(ik.Curvature(target, train, kind="ggn"), RUNTIME)
    candidates["Identity"] = (ik.Influence(target, identity).self_influence(train, RUNTIME),
                              time.time() - t0)
    settings = optional_settings(exact, target.num_params)
    # Self-influence solves one system per TRAINING example: the iterative solvers (CG, LiSSA)
    # would need 4,500 solves, so only the factored/low-rank methods are run here.
    for name in ("Arnoldi", "KFAC", "EKFAC"):
        if name in REGISTRY:
            try:
                t0 = time.time()
                inv = REGISTRY[name](damping=0.0, **settings[name]).fit(
                    ik.Curvature(target, train), RUNTIME)
                candidates[name] = (ik.Influence(target, inv).self_influence(train, RUNTIME),
                                    time.time() - t0)
            except Exception as exc:
                log(f"  {name} failed: {type(exc).__name__}: {exc}")
    with torch.no_grad():
        losses = target.losses(target.params(torch.float64), train)
    candidates["Loss"] = (losses, 0.0)
    for name, (s, secs) in candidates.items():
        out = mislabel_detection(s.numpy(), flipped)
        rows.append(row("mnist_mislabel", name, mislabel_auc=out["auc"], seconds=secs,
                        found_at_10pct=out["found"][0.1]))
        log(f"  {name:9s} AUC {out['auc']:.3f}  found in top 10%: {out['found'][0.1]:.2f}")


def mnist_removal(cfg, rows):
    """Removal curves on the convex MNIST logistic regression: for a few queries, remove the
    top-k training examples by Exact and by Identity (gradient similarity) scores, and k random
    ones, retrain warm-started from θ̂ (L-BFGS to grad 1e-8) and record the change of the query's
    loss. Rows ``mnist_removal`` carry ``k`` and ``mean_change`` / ``stderr`` over queries."""
    from influencekit.data.mnist import mnist_split
    from influencekit.evaluation import removal_curve
    log("MNIST logistic regression removal curves (warm start)")
    train, query = mnist_split(4500, 500, dims=50)
    target = train_target(nn.Linear(50, 10).to(torch.float64), train, l2=1e-3, grad_tol=1e-10,
                          seed_init=torch.zeros(510, dtype=torch.float64))
    exact = ik.Exact(damping=0.0).fit(ik.Curvature(target, train, kind="ggn"), RUNTIME)
    sc = ik.Influence(target, exact)
    picked = np.random.default_rng(2).choice(len(query[1]), size=cfg["removal_queries"],
                                             replace=False)
    sub = tuple(t[torch.as_tensor(picked)] for t in query)
    identity = ik.Identity(damping=0.0).fit(ik.Curvature(target, train, kind="ggn"), RUNTIME)
    methods = {"Exact": sc.pairwise(sub, train, RUNTIME),
               "Identity": ik.Influence(target, identity).pairwise(sub, train, RUNTIME)}
    ks, retrainer = cfg["removal_ks"], LBFGSRetrainer(grad_tol=1e-8)
    changes = {name: [] for name in (*methods, "random")}
    t0 = time.time()
    for q in range(len(picked)):
        for name, s in methods.items():
            curve = removal_curve(target, train, sub, q, s[q].numpy(), ks, retrainer,
                                  random_seed=q, runtime=RUNTIME)
            changes[name].append(curve["top"])
            if name == "Exact":  # the random-k curve is the same for every method
                changes["random"].append(curve["random"])
    log(f"  {len(picked)} queries x {len(ks)} k: {time.time() - t0:.0f}s")
    for name, values in changes.items():
        v = np.asarray(values)
        for j, k in enumerate(ks):
            mean, se = float(v[:, j].mean()), float(v[:, j].std(ddof=1) / np.sqrt(len(v)))
            rows.append(row("mnist_removal", name, k=k, mean_change=mean, stderr=se))
            log(f"  {name:9s} k={k:4d}  mean Δloss {mean:+.4f} ± {se:.4f}")


def run(suite: str) -> list[dict]:
    cfg = SUITES[suite]
    rows: list[dict] = []
    torch.set_num_threads(max(1, torch.get_num_threads()))
    warnings.filterwarnings("ignore", message=".*re-optimisation stopped.*")
    if cfg.get("removal_only"):
        tasks = (mnist_removal,)
    elif cfg.get("skip_linear"):
        tasks = (digits_mlp,)
    else:
        tasks = (mnist_logistic, digits_mlp, mnist_mislabel, mnist_removal)
    for task in tasks:
        t0 = time.time()
        task(cfg, rows)
        log(f"  ({time.time() - t0:.0f}s)")
    if cfg["mnist_mlp"]:
        mnist_mlp(cfg, rows)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    t0 = time.time()
    rows = run(args.suite)
    log(f"total {time.time() - t0:.0f}s")
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(r)


if __name__ == "__main__":
    main()
