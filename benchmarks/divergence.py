"""Influence fades with training time (Schioppa et al. 2023, arXiv:2305.16971), issue 5.

An MLP on scikit-learn digits is trained to θ̂; training then continues with SGD for T steps
(T = 1, 2, 4, … up to the end) with one training example's weight set to 1 + ε (ε = +1 up-weight,
ε = −1 removal) beside a control run on the same mini-batches. For M examples and Q test queries,
the real change of each query loss is correlated with the first-order prediction
g_qᵀ ε ∂θ/∂w_m (Exact GGN inverse). Writes a table (stdout, markdown) and a PNG plot.

    PYTHONPATH=src python benchmarks/divergence.py [--steps 2048] [--damping 1.0] [--png PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _digits import digits_splits, train_mlp  # noqa: E402

import influencekit as ik  # noqa: E402
from influencekit import diagnostics as dg  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--damping", type=float, default=1.0)
    parser.add_argument("--png", default=str(Path(__file__).parent / "divergence.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, _, pool = digits_splits()
    target, _ = train_mlp(train)
    t0 = time.time()
    inverse = ik.Exact(damping=args.damping).fit(ik.Curvature(target, train, kind="ggn"))
    queries = (pool[0][:args.queries], pool[1][:args.queries])
    gen = torch.Generator().manual_seed(0)
    indices = torch.randperm(len(train[1]), generator=gen)[:args.examples].tolist()
    setup = dg.TrainingSetup(steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    curves = {eps: dg.parameter_divergence(target, inverse, train, queries, indices, setup,
                                           epsilon=eps) for eps in (1.0, -1.0)}
    print(f"digits MLP p={target.num_params}, n={len(train[1])}, SGD lr={args.lr} batch "
          f"{args.batch_size}, {args.examples} examples x {args.queries} query losses, Exact GGN "
          f"damping {args.damping}; {time.time() - t0:.0f}s\n")
    print("| T | eps | Pearson(real, pred) dloss | Spearman | cos(dθ_real, dθ_pred) | "
          "‖dθ_real − dθ_pred‖/‖dθ_pred‖ |")
    print("|---:|---:|---:|---:|---:|---:|")
    for eps, curve in curves.items():
        for row in curve.to_table():
            print(f"| {row['T']} | {eps:+g} | {row['pearson']:.3f} | {row['spearman']:.3f} | "
                  f"{row['theta_cosine']:.3f} | {row['theta_relative_error']:.3f} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for eps, curve in curves.items():
        table = curve.to_table()
        t = [r["T"] for r in table]
        axes[0].semilogx(t, [r["pearson"] for r in table], "o-", base=2,
                         label=f"eps={eps:+g} Pearson")
        axes[0].semilogx(t, [r["spearman"] for r in table], "s--", base=2,
                         label=f"eps={eps:+g} Spearman")
        axes[1].semilogx(t, [r["theta_cosine"] for r in table], "o-", base=2,
                         label=f"eps={eps:+g}")
    axes[0].set(xlabel="continued-training steps T", ylabel="correlation",
                title="query-loss change: real vs influence")
    axes[1].set(xlabel="continued-training steps T", ylabel="cosine",
                title="parameter change: real vs influence")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"\nplot: {args.png}")


if __name__ == "__main__":
    main()
