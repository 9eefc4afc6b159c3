"""Workers for fault injection (:mod:`influencekit.testing.faults`): long, resumable runs.

    python -m influencekit.testing.workers subset_retraining STORE [--rows all|even|odd]
        [--subsets K]
    python -m influencekit.testing.workers stream_scores STORE [--rank R --ranks N]
        [--partition I/N] [--train N_TRAIN]

``subset_retraining``: :func:`influencekit.response.subset_retraining` of a small L2-regularised
logistic regression (float64, L-BFGS to a gradient tolerance: deterministic, so two runs give
bit-identical rows) into the results store ``STORE``; ``--rows even|odd`` computes one of two
partitions.

``stream_scores``: :func:`influencekit.stream_scores` of a small MLP (an Exact inverse, float64
gradients, float32 scores, blocks of 6 training examples, every block committed at once) into
the score store ``STORE``; ``--partition I/N`` writes one partition's partial store;
``--rank R --ranks N`` writes rank R's share of the blocks of ONE store shared by N processes
(:class:`IndependentRank`: a rank without collectives, as torchrun's ranks would write it).

Only the public API is used. Add a worker here for every stage that writes a store.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import numpy as np
import torch
from torch import nn

from ..distributed import DistContext
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


SCORE_BLOCK = 6


def score_problem(n_train: int = 240):
    """``(influence, train, query)`` of the stream_scores worker: a float64 MLP on Gaussian
    data with an Exact inverse (damping 1e-2), 5 queries."""
    import influencekit as ik

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + 5, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n_train + 5,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-3))
    train, query = (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
    inverse = ik.Exact(damping=1e-2).fit(ik.Curvature(target, train), stationarity=False)
    return ik.Influence(target, inverse), train, query


class IndependentRank(DistContext):
    """Rank ``rank`` of ``world_size`` processes that share a score store but no process group:
    each takes its contiguous share of the blocks (as a torchrun rank would) and the
    collectives are local (a sum is this rank's own value, a barrier returns at once). For
    fault injection of several writers of one store without torchrun."""

    def barrier(self) -> None:
        return None

    def all_reduce_sum_(self, tensors):
        return tensors


def stream_scores(store, rank: int = 0, ranks: int = 1, partition: str | None = None,
                  n_train: int = 240, problem=None):
    """Run the score worker's problem (``problem``: :func:`score_problem`'s, built when None)
    into ``store``; returns the :class:`~influencekit.scoring.StreamedScores`."""
    import influencekit as ik

    influence, train, query = problem or score_problem(n_train)
    context = IndependentRank(rank, ranks) if ranks > 1 else None
    return ik.stream_scores(influence, query, train, store=store, block_size=SCORE_BLOCK,
                            store_dtype="float32", partition=partition, context=context,
                            commit_seconds=0.0, runtime=ik.Runtime(progress=False))


def score_store_state(folder):
    """``(done [blocks] bool, [block values])`` of a score store now (None: no store yet), every
    done block verified: the ``read`` of a :class:`~influencekit.testing.faults.RowLedger`."""
    from pathlib import Path

    from influencekit.storage import ScoreStore

    if not (Path(folder) / "manifest.json").exists():
        return None
    store = ScoreStore.load(folder, writable=False)
    n_qb, n_tb = store.grid
    done = store.done().reshape(-1)
    values = [store.read_block(qi, ti).numpy() for qi in range(n_qb) for ti in range(n_tb)]
    return done, values


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
    scores = sub.add_parser("stream_scores")
    scores.add_argument("store")
    scores.add_argument("--rank", type=int, default=0)
    scores.add_argument("--ranks", type=int, default=1)
    scores.add_argument("--partition", default=None)
    scores.add_argument("--train", type=int, default=240)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # Imports before the checkpoint, so that kills land in the work (torch.optim imports
    # torch._dynamo on first use, which takes seconds).
    importlib.import_module("influencekit")
    importlib.import_module("torch._dynamo")

    # the score problem is fitted before the kill clock starts
    problem = score_problem(args.train) if args.worker == "stream_scores" else None
    checkpoint()
    if args.worker == "subset_retraining":
        subset_retraining(args.store, args.rows, args.subsets)
    elif args.worker == "stream_scores":
        stream_scores(args.store, args.rank, args.ranks, args.partition, args.train, problem)


if __name__ == "__main__":
    main()
