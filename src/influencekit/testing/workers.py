"""Workers for fault injection (:mod:`influencekit.testing.faults`): long, resumable runs.

    python -m influencekit.testing.workers subset_retraining STORE [--rows all|even|odd]
        [--subsets K]
    python -m influencekit.testing.workers stream_scores STORE [--rank R --ranks N]
        [--partition I/N] [--train N_TRAIN]
    python -m influencekit.testing.workers score_store FOLDER
    python -m influencekit.testing.workers fit_store FOLDER [--method KFAC|EKFAC|Exact]
        [--examples N] [--chunk C]
    python -m influencekit.testing.workers gradient_store STORE [--examples N]

- ``subset_retraining``: :func:`influencekit.response.subset_retraining` of a small
  L2-regularised logistic regression (float64, L-BFGS to a gradient tolerance: deterministic, so
  two runs give bit-identical rows) into the results store ``STORE``; ``--rows even|odd``
  computes one of two partitions.
- ``stream_scores``: :func:`influencekit.stream_scores` of :func:`score_problem` (an Exact
  inverse, float64 gradients, float32 scores, blocks of 6 training examples, every block
  committed at once) into the score store ``STORE``; ``--partition I/N`` writes one partition's
  partial store; ``--rank R --ranks N`` writes rank R's share of the blocks of ONE store shared
  by N processes (:class:`IndependentRank`: a rank without collectives, as torchrun's ranks
  would write it).
- ``score_store``: :func:`influencekit.stream_scores` of :func:`score_problem` with 1200
  training examples in blocks of 6 (one block of 5 queries, top-5) into the score store
  ``FOLDER/store``, committing every 20 ms; the top-k goes to ``FOLDER/top_k.safetensors`` at
  the end.
- ``fit_store``: an EK-FAC (or K-FAC, Exact) fit of :func:`fit_problem` with a
  :class:`~influencekit.storage.FitStore` in ``FOLDER/fit`` (chunks of ``C`` examples, default
  one batch of 10); the fitted inverse is saved to ``FOLDER/inverse`` at the end.
- ``gradient_store``: :func:`influencekit.scoring.build_gradient_store` of
  :func:`gradient_problem` (the fit worker's MLP, every layer's gradient projected to 3 x 4,
  float64 compute, float32 rows, batches of 10) into the gradient store ``STORE``. The store
  has no partitions: ``build_gradient_store`` computes every row not yet done.

Only the public API is used; every worker is deterministic (float64, one thread), so an
interrupted and resumed run can be compared bit for bit with an uninterrupted one. Add a worker
here for every stage that writes a store.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

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


def score_problem(n_train=23, n_query=5, d_in=6, hidden=8, classes=3, damping=1e-2, seed=0,
                  n_fit=None):
    """``(influence, train, query)``: an Exact-inverse Influence of a float64 tanh MLP in eval
    mode with an L2 regulariser (the stream_scores and score_store workers' problem), its
    curvature fitted on the first ``n_fit`` training examples (default all) without the
    stationarity check (the MLP is untrained). The same seeds give the same bits."""
    import influencekit as ik

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_query, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n_train + n_query,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(),
                          nn.Linear(hidden, classes)).double().eval()
    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-3))
    train = (x[:n_train], y[:n_train])
    query = (x[n_train:], y[n_train:])
    fit_on = tuple(t[:n_fit] for t in train)
    inverse = ik.Exact(damping=damping).fit(ik.Curvature(target, fit_on, kind="ggn"),
                                            stationarity=False)
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


def score_store(folder) -> None:
    """The ``score_store`` worker (module docstring)."""
    from safetensors.torch import save_file

    import influencekit as ik

    folder = Path(folder)
    influence, train, query = score_problem(1200)
    checkpoint()
    result = ik.stream_scores(influence, query, train, k=5, store=folder / "store",
                              block_size=6, store_dtype="float32",
                              runtime=ik.Runtime(progress=False), commit_seconds=0.02)
    top = result.top_k
    tmp = folder / "top_k.safetensors.tmp"
    save_file({"helpful_scores": top.helpful_scores, "helpful_indices": top.helpful_indices,
               "harmful_scores": top.harmful_scores, "harmful_indices": top.harmful_indices},
              str(tmp))
    os.replace(tmp, folder / "top_k.safetensors")


FIT_BATCH = 10


def fit_problem(n_train: int = 240, seed: int = 0):
    """``(target, train)``: a float64 MLP 8-24-24-4 classifier with an L2 regulariser (three
    K-FAC layers) and its training data."""
    import influencekit as ik

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n_train,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                          nn.Linear(24, 4)).double()
    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-3))
    return target, (x, y)


def fit_inverse(method: str = "EKFAC", n_train: int = 240, store=None, chunk=None):
    """The ``fit_store`` worker's fit (``store=None``: in memory, no store)."""
    import influencekit as ik

    target, train = fit_problem(n_train)
    inverse = getattr(ik, method)(damping=1e-2)
    runtime = ik.Runtime(batch_size=FIT_BATCH, progress=False)
    fit_store = None if store is None else ik.storage.FitStore(store, chunk_size=chunk)
    return inverse.fit(ik.Curvature(target, train, kind="ggn"), runtime, store=fit_store)


def fit_store(folder, method: str = "EKFAC", n_train: int = 240, chunk: int | None = None):
    """The ``fit_store`` worker (module docstring)."""
    import influencekit as ik

    folder = Path(folder)
    fit_problem(n_train)  # build once before the checkpoint: the kills land in the fit
    checkpoint()
    inverse = fit_inverse(method, n_train, folder / "fit", chunk or FIT_BATCH)
    ik.storage.save_inverse(folder / "inverse", inverse)


GRADIENT_BATCH = 10


def gradient_problem(n_train: int = 240, seed: int = 0):
    """``(target, train, projection, runtime)`` of the gradient-store worker: the fit worker's
    float64 MLP and data, LoGra projections of every layer to 3 x 4 (``seed``), batches of
    10."""
    import influencekit as ik

    target, train = fit_problem(n_train)
    projection = ik.grads.LayerProjection((3, 4), seed=seed)
    return target, train, projection, ik.Runtime(batch_size=GRADIENT_BATCH, progress=False)


def build_gradients(store, n_train: int = 240, seed: int = 0, problem=None):
    """The gradient-store worker's build into ``store`` (``problem``: :func:`gradient_problem`'s,
    built when None); returns the :class:`~influencekit.storage.GradientStore`."""
    from influencekit.scoring import build_gradient_store

    target, train, projection, runtime = problem or gradient_problem(n_train, seed)
    return build_gradient_store(store, target, train, projection, runtime, dtype="float32")


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
    store = sub.add_parser("score_store")
    store.add_argument("folder")
    fit = sub.add_parser("fit_store")
    fit.add_argument("folder")
    fit.add_argument("--method", choices=("KFAC", "EKFAC", "Exact"), default="EKFAC")
    fit.add_argument("--examples", type=int, default=240)
    fit.add_argument("--chunk", type=int)
    gradients = sub.add_parser("gradient_store")
    gradients.add_argument("store")
    gradients.add_argument("--examples", type=int, default=240)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # Imports before the checkpoint, so that kills land in the work (torch.optim imports
    # torch._dynamo on first use, which takes seconds).
    importlib.import_module("influencekit")
    importlib.import_module("torch._dynamo")

    if args.worker == "subset_retraining":
        checkpoint()
        subset_retraining(args.store, args.rows, args.subsets)
    elif args.worker == "stream_scores":
        problem = score_problem(args.train)  # fitted before the kill clock starts
        checkpoint()
        stream_scores(args.store, args.rank, args.ranks, args.partition, args.train, problem)
    elif args.worker == "score_store":
        score_store(args.folder)  # calls checkpoint() once its problem is built
    elif args.worker == "fit_store":
        fit_store(args.folder, args.method, args.examples, args.chunk)
    elif args.worker == "gradient_store":
        problem = gradient_problem(args.examples)  # built before the kill clock starts
        checkpoint()
        build_gradients(args.store, problem=problem)


if __name__ == "__main__":
    main()
