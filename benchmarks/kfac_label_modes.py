"""K-FAC / EK-FAC label modes against the exact damped GGN on a digits MLP (correlations only).

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/kfac_label_modes.py [--json]

Trains a 64-32-10 tanh MLP on scikit-learn digits (float64, L2 1e-3, L-BFGS to convergence),
fits Exact(ggn) and K-FAC/EK-FAC with labels "exact" / "sampled" (1 sample, seed 0), then
compares pairwise scores of 50 test queries × all training examples: Pearson over all pairs and
the mean over queries of the Spearman correlation across training examples.
"""

import argparse
import json

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import influencekit as ik


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--damping", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target)
    train, query = (x[:1000], y[:1000]), (x[1000:1050], y[1000:1050])
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(torch.float64)
    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-3))
    result = ik.minimize(target, train)
    ik.write_params(target, result.params)
    curvature = ik.Curvature(target, train, kind="ggn")
    runtime = ik.Runtime(batch_size=500)
    reference = ik.Influence(target, ik.Exact(args.damping).fit(curvature, runtime))
    ref = reference.pairwise(query, train, runtime).numpy()
    rows = []
    methods = {
        "kfac_exact": ik.KFAC(args.damping, labels="exact"),
        "kfac_sampled": ik.KFAC(args.damping, labels="sampled"),
        "ekfac_exact": ik.EKFAC(args.damping, labels="exact"),
        "ekfac_sampled": ik.EKFAC(args.damping, labels="sampled"),
    }
    for name, inverse in methods.items():
        scores = ik.Influence(target, inverse.fit(curvature, runtime)).pairwise(query, train,
                                                                                runtime).numpy()
        rows.append({"method": name,
                     "pearson_vs_exact": ik.evaluation.pearson(scores, ref),
                     "spearman_vs_exact": float(np.mean([ik.evaluation.spearman(s, r)
                                                         for s, r in zip(scores, ref,
                                                                         strict=True)]))})
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"digits MLP 64-32-10, n_train=1000, 50 queries, damping={args.damping}")
        print("| method | Pearson vs Exact | per-query Spearman vs Exact |")
        print("| --- | --- | --- |")
        for r in rows:
            print(f"| {r['method']} | {r['pearson_vs_exact']:.3f} | "
                  f"{r['spearman_vs_exact']:.3f} |")


if __name__ == "__main__":
    main()
