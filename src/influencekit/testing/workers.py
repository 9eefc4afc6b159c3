"""Workers for fault injection (:mod:`influencekit.testing.faults`): long, resumable runs.

    python -m influencekit.testing.workers subset_retraining STORE [--rows all|even|odd]
        [--subsets K]

``subset_retraining``: :func:`influencekit.response.subset_retraining` of a small L2-regularised
logistic regression (float64, L-BFGS to a gradient tolerance: deterministic, so two runs give
bit-identical rows) into the results store ``STORE``; ``--rows even|odd`` computes one of two
partitions. Only the public API is used. Add a worker here for every stage that writes a store.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import numpy as np
import torch
from torch import nn

from .faults import checkpoint


def subset_problem(n_subsets: int = 24):
    """``(target, train, query, masks [n_subsets, 40], retrainer)`` of the subset worker."""
    import influencekit as ik

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 5, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(50, generator=gen, dtype=torch.float64) > 0).long()
    torch.manual_seed(0)
    model = nn.Linear(5, 2).double()
    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-2))
    masks = np.random.default_rng(0).random((n_subsets, 40)) < 0.5
    retrainer = ik.response.LBFGSRetrainer(grad_tol=1e-10)
    return target, (x[:40], y[:40]), (x[40:], y[40:]), masks, retrainer


def partition_rows(which: str, n_subsets: int) -> list[int] | None:
    """Rows of partition ``which`` (``"all"``: None, every row; ``"even"``; ``"odd"``)."""
    if which == "all":
        return None
    return list(range(0 if which == "even" else 1, n_subsets, 2))


def subset_retraining(store=None, which: str = "all", n_subsets: int = 24) -> np.ndarray:
    """Run the subset worker's problem (into ``store`` when given): ``[n_subsets, 10]``."""
    import influencekit as ik

    target, train, query, masks, retrainer = subset_problem(n_subsets)
    rows = partition_rows(which, n_subsets) if store is not None else None
    return ik.response.subset_retraining(target, train, masks, query, retrainer, store=store,
                                         rows=rows)


def command(name: str, *args: str) -> list[str]:
    """The argv that runs worker ``name`` in a fresh Python process."""
    return [sys.executable, "-m", "influencekit.testing.workers", name, *map(str, args)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="worker", required=True)
    subset = sub.add_parser("subset_retraining")
    subset.add_argument("store")
    subset.add_argument("--rows", choices=("all", "even", "odd"), default="all")
    subset.add_argument("--subsets", type=int, default=24)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # Imports before the checkpoint, so that kills land in the work (torch.optim imports
    # torch._dynamo on first use, which takes seconds).
    importlib.import_module("influencekit")
    importlib.import_module("torch._dynamo")

    checkpoint()
    if args.worker == "subset_retraining":
        subset_retraining(args.store, args.rows, args.subsets)


if __name__ == "__main__":
    main()
