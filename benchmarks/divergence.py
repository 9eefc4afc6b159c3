"""Influence fades with training time (Schioppa et al. 2023, arXiv:2305.16971), issues 5 and 10.

From the trained θ̂, training continues with SGD for T = 1, 2, 4, … 512 steps with the weights of
one example (``digits``) or one GROUP of examples (``fashion``, ``minilm``) set to 1 + ε
(ε = +1 up-weights, ε = −1 removes), beside a control run on the same mini-batches
(``ik.diagnostics.group_divergence``). The real change of Q held-out query losses is set
against the first-order prediction −(ε/n) g_qᵀ (C + λI)⁻¹ Σ_{m∈G} g_m.

The damping makes the horizon explicit: λ_h = 1/(η·T_h) (``ik.diagnostics.horizon_damping``)
describes T_h steps of SGD with learning rate η; one prediction per ``--horizons`` T_h, all
set against the same training runs.

Tasks (``--task``):
  digits   MLP on scikit-learn digits, 20 single examples, Exact GGN (``--damping``) (issue 5)
  fashion  Fashion-MNIST ResNet, ALL conv layers + classifier, EK-FAC; groups
  minilm   MiniLM fine-tuned end to end on tweets (benchmarks/_tweets.py), the Linear layers of
           the last two encoder blocks + pooler + classifier, EK-FAC; groups

Groups: the training examples of one class whose training loss at θ̂ is above ("hard") or below
("easy") that class's median (``--groups-per-class 2``), or whole classes (1); ``--group-size N``
keeps N random members of each.

    PYTHONPATH=src python benchmarks/divergence.py --task minilm [--steps 512] [--lr 0.05]
        [--batch-size 8] [--queries 30] [--horizons 4,32,512] [--png PATH] [--json]
    PYTHONPATH=src python benchmarks/divergence.py --task minilm --trust   # TrustReport row
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from correction import digest  # noqa: E402  (the cache keys of the correction benchmark)

import influencekit as ik  # noqa: E402
from influencekit import diagnostics as dg  # noqa: E402

HERE = Path(__file__).parent


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def with_damping(inverse, damping: float):
    """The fitted EK-FAC ``inverse`` with another damping on every layer: its Kronecker
    eigenbases and eigenvalues do not depend on λ, so its state is reused (no refit)."""
    state = dict(inverse.state_dict())
    state["layer_damping_"] = torch.full_like(state["layer_damping_"], float(damping))
    info = dict(inverse.fit_info_)
    info["damping"] = {name: float(damping) for name in info["damping"]}
    return inverse.clone(damping=float(damping)).load_state_dict(state, info)


def class_loss_groups(target, train, labels, per_class: int, runtime) -> list[list[int]]:
    """Per class: its examples split at the median training loss at θ̂ (hard half first), or
    the whole class (``per_class=1``)."""
    losses = ik.response.measure(target, target.flat_params(), train, runtime)
    groups = []
    for c in sorted(set(labels.tolist())):
        idx = (labels == c).nonzero()[:, 0]
        if per_class == 1:
            groups.append(idx.tolist())
            continue
        order = idx[torch.argsort(losses[idx], descending=True)]
        half = len(order) // 2
        groups += [order[:half].tolist(), order[half:].tolist()]
    return groups


def subset(group: list[int], size: int, seed: int) -> list[int]:
    """``size`` members of ``group`` drawn at random (seeded), in index order; all if fewer."""
    if len(group) <= size:
        return group
    pick = torch.randperm(len(group), generator=torch.Generator().manual_seed(seed))[:size]
    return sorted(group[i] for i in pick.tolist())


# -- tasks: (name, target, train, query, labels of train, runtime) ------------------------------
def fashion_problem(args, log):
    import _fashion

    data = _fashion.correction_splits()
    model = _fashion.train_resnet(data["train"])
    target = ik.Target(model, ik.ClassificationTask(), params=_fashion.conv_and_fc(model))
    query = tuple(t[:args.queries] for t in data["heldout_val"])
    key = digest("fashion-conv", target.fingerprint())
    return "fashion-resnet-conv", key, target, data["train"], query, data["train"][1], \
        ik.Runtime(batch_size=128)


def minilm_problem(args, log):
    import _tweets

    setting = _tweets.Setting()
    model, _, data = _tweets.finetuned_minilm(setting, log)
    target = ik.Target(model, ik.SequenceClassificationTask(),
                       params=_tweets.LAST_TWO_BLOCKS_AND_HEAD)
    query = {k: v[:args.queries] for k, v in data["heldout_val"].items()}
    key = digest("minilm", setting.key(), target.fingerprint())
    return "minilm-tweets", key, target, data["train"], query, data["train"]["labels"], \
        ik.Runtime(batch_size=32)


PROBLEMS = {"fashion": fashion_problem, "minilm": minilm_problem}


def fitted_ekfac(key, target, train, runtime, log):
    """EK-FAC (damping 'auto') on the GGN: the correction benchmark's cached inverse."""
    from correction import fitted_inverse

    options = argparse.Namespace(inverse="ekfac", damping="auto")
    return fitted_inverse(target, train, key, options, runtime, log, small_block=0)


def groups_run(args, log):
    t0 = time.time()
    name, key, target, train, query, labels, runtime = PROBLEMS[args.task](args, log)
    setup = dg.TrainingSetup(steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    base = fitted_ekfac(key, target, train, runtime, log)
    horizons = [int(h) for h in args.horizons.split(",")]
    inverses = [with_damping(base, dg.horizon_damping(setup, h)) for h in horizons]
    groups = class_loss_groups(target, train, labels, args.groups_per_class, runtime)
    if args.group_size:
        groups = [subset(g, args.group_size, seed) for seed, g in enumerate(groups)]
    log(f"{name}: p={target.num_params}, n={len(labels)}, {len(groups)} groups of "
        f"{[len(g) for g in groups]}, {args.queries} query losses; SGD lr {args.lr} batch "
        f"{args.batch_size}, {args.steps} steps; EK-FAC dampings "
        f"{[f'{1 / (args.lr * h):.3g}' for h in horizons]} (horizons {horizons}); "
        f"mean layer eigenvalue {sum(base.fit_info_['mean_eigenvalue'].values()) / len(base.fit_info_['mean_eigenvalue']):.3g}; "  # noqa: E501
        f"set-up {time.time() - t0:.0f}s ({load()})")
    curves = {}
    for eps in args.epsilons:
        t1 = time.time()
        found = dg.group_divergence(target, inverses, train, query, groups, setup, epsilon=eps,
                                    runtime=runtime, keep_theta=False)
        for h, curve in zip(horizons, found, strict=True):
            curves[(eps, h)] = curve
        log(f"  eps {eps:+g}: {1 + len(groups)} runs of {args.steps} steps in "
            f"{time.time() - t1:.0f}s ({load()})")
    return name, curves, time.time() - t0


def digits_run(args, log):
    from _digits import digits_splits, train_mlp

    t0 = time.time()
    train, _, pool = digits_splits()
    target, _ = train_mlp(train)
    inverse = ik.Exact(damping=args.damping).fit(ik.Curvature(target, train, kind="ggn"))
    queries = (pool[0][:args.queries], pool[1][:args.queries])
    gen = torch.Generator().manual_seed(0)
    indices = torch.randperm(len(train[1]), generator=gen)[:args.examples].tolist()
    setup = dg.TrainingSetup(steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    curves = {(eps, None): dg.parameter_divergence(target, inverse, train, queries, indices,
                                                   setup, epsilon=eps)
              for eps in args.epsilons}
    log(f"digits MLP p={target.num_params}, n={len(train[1])}, SGD lr={args.lr} batch "
        f"{args.batch_size}, {args.examples} examples x {args.queries} query losses, Exact GGN "
        f"damping {args.damping}")
    return "digits-mlp", curves, time.time() - t0


def rows_of(name, curves) -> list[dict]:
    rows = []
    for (eps, horizon), curve in curves.items():
        for r in curve.to_table():
            rows.append({"task": name, "epsilon": eps, "horizon_damped": horizon,
                         "damping": curve.damping, **r})
    return rows


def print_table(rows) -> None:
    print("| T | ε | damping (horizon) | Pearson(real, pred) Δloss | Spearman | "
          "cos(Δθ_real, Δθ_pred) | ‖Δθ_real − Δθ_pred‖/‖Δθ_pred‖ |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        damped = f"{r['damping']:.3g}" + (f" (T={r['horizon_damped']})"
                                           if r["horizon_damped"] else "")
        print(f"| {r['T']} | {r['epsilon']:+g} | {damped} | {r['pearson']:.3f} | "
              f"{r['spearman']:.3f} | {r['theta_cosine']:.3f} | "
              f"{r['theta_relative_error']:.3g} |")


def plot(path: str, name: str, curves) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keys = sorted({h for _, h in curves}, key=lambda h: (h is None, h))
    for (eps, horizon), curve in curves.items():
        table = curve.to_table()
        t = [r["T"] for r in table]
        color = colors[keys.index(horizon) % len(colors)]
        style = "o-" if eps > 0 else "s--"
        label = (f"ε={eps:+g}, λ={curve.damping:.3g}"
                 + (f" (=1/(η·{horizon}))" if horizon else ""))
        axes[0].semilogx(t, [r["pearson"] for r in table], style, base=2, color=color,
                         label=label)
        axes[1].semilogx(t, [r["theta_cosine"] for r in table], style, base=2, color=color,
                         label=label)
        if horizon:
            for ax in axes:
                ax.axvline(horizon, color=color, lw=0.6, alpha=0.5)
    axes[0].set(xlabel="continued-training steps T", ylabel="Pearson correlation",
                title=f"{name}: query-loss change, real vs influence")
    axes[1].set(xlabel="continued-training steps T", ylabel="cosine",
                title="parameter change, real vs influence")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def trust_row(args, log) -> None:
    """The TrustReport's parameter-divergence row (``ik.diagnostics.check``) on the task."""
    name, key, target, train, query, _, runtime = PROBLEMS[args.task](args, log)
    inverse = fitted_ekfac(key, target, train, runtime, log)
    setup = dg.TrainingSetup(steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    t0 = time.time()
    report = ik.diagnostics.check(target, inverse, train, query, runtime,
                                  include=("parameter divergence",), training=setup,
                                  examples=args.examples)
    log(f"{name}: check(include=('parameter divergence',)) in {time.time() - t0:.0f}s "
        f"({load()})")
    print(report.to_text() if hasattr(report, "to_text") else report)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="digits", choices=("digits", *PROBLEMS))
    parser.add_argument("--steps", type=int, default=None,
                        help="end of training (digits 2048, groups 512)")
    parser.add_argument("--lr", type=float, default=None, help="SGD (digits 0.1, groups 0.05)")
    parser.add_argument("--batch-size", type=int, default=None, help="digits 64, groups 8")
    parser.add_argument("--examples", type=int, default=20,
                        help="digits: single examples; --trust: examples re-trained")
    parser.add_argument("--queries", type=int, default=None, help="digits 10, groups 30")
    parser.add_argument("--damping", type=float, default=1.0, help="digits: Exact damping")
    parser.add_argument("--horizons", default="4,32,512",
                        help="groups: dampings 1/(lr·T_h) for these T_h")
    parser.add_argument("--groups-per-class", type=int, default=2, choices=(1, 2))
    parser.add_argument("--group-size", type=int, default=None,
                        help="groups: keep this many random members of each group (cheaper "
                             "group gradients on large models); default all")
    parser.add_argument("--epsilons", default="1,-1")
    parser.add_argument("--png", default=None)
    parser.add_argument("--json", action="store_true", help="also print JSON rows")
    parser.add_argument("--trust", action="store_true",
                        help="only the TrustReport's parameter-divergence row")
    args = parser.parse_args()
    digits = args.task == "digits"
    args.steps = args.steps or (2048 if digits else 512)
    args.lr = args.lr or (0.1 if digits else 0.05)
    args.batch_size = args.batch_size or (64 if digits else 8)
    args.queries = args.queries or (10 if digits else 30)
    args.epsilons = [float(e) for e in args.epsilons.split(",")]
    args.png = args.png or str(HERE / ("divergence.png" if digits else
                                       f"divergence_{args.task}.png"))
    torch.set_num_threads(1)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("influencekit").setLevel(logging.INFO)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    if args.trust:
        trust_row(args, log)
        return
    name, curves, seconds = (digits_run if digits else groups_run)(args, log)
    rows = rows_of(name, curves)
    print(f"{name}: {seconds:.0f}s in all ({load()})\n")
    print_table(rows)
    plot(args.png, name, curves)
    print(f"\nplot: {args.png}")
    if args.json:
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
