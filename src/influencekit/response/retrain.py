"""Retraining from scratch or from a warm start: the ground truth influence is checked against.

A :class:`Retrainer` trains the Target's parameters on a subset of the training data (given by
indices) from an initial flat vector and a seed, and returns the trained flat parameters
``[p]`` (float64). It never writes the user's model.

- :class:`LBFGSRetrainer`: full-batch L-BFGS in float64 to a gradient tolerance (convex or small
  models; deterministic, the seed is unused);
- :class:`SGDRetrainer`: minibatch SGD or Adam for a fixed number of epochs, shuffled by the seed
  (MLPs; the seed makes the run reproducible).

On top of them: :func:`leave_one_out_retrained` (cold or warm start, any retrainer) and
:func:`subset_retraining` (many subsets, e.g. for the LDS) whose rows go to a resumable
:class:`~influencekit.storage.ResultsArray`.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..grads import as_loader, iter_batches, num_examples, take
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target
from .curve import measure
from .optimize import minimize_function
from .training import batch_schedule, check_optimizer
from .training import train as train_fn


@runtime_checkable
class Retrainer(Protocol):
    """Trains a Target on a subset of the training data; returns flat parameters ``[p]``."""

    def retrain(self, target: Target, train, indices, *, seed: int = 0,
                init: torch.Tensor | None = None,
                runtime: Runtime | None = None) -> torch.Tensor:
        """Train on ``train[indices]`` from ``init`` (default: the Target's current parameters,
        a warm start); return the trained flat parameters ``[p]`` in float64."""


def subset_data(train, indices, runtime: Runtime):
    """``train`` restricted to ``indices`` (:func:`influencekit.grads.take`)."""
    return take(train, indices, runtime, "training data")


def _start(target: Target, init, dtype, runtime: Runtime) -> torch.Tensor:
    if init is None:
        return target.flat_params(dtype, runtime.device)
    return torch.as_tensor(init).detach().to(dtype=dtype, device=runtime.device).clone()


class LBFGSRetrainer:
    """Full-batch L-BFGS (float64) of ``mean loss + R`` on the subset, to ``grad_tol``."""

    def __init__(self, grad_tol: float = 1e-10, max_iter: int = 2000):
        self.grad_tol = grad_tol
        self.max_iter = max_iter

    def retrain(self, target, train, indices, *, seed=0, init=None, runtime=None):
        runtime = resolve_runtime(runtime)
        start = _start(target, init, torch.float64, runtime)
        loader = as_loader(subset_data(train, indices, runtime), runtime, "training data")
        cached = [(b, w) for _, b, w in iter_batches(
            loader, runtime, torch.float64, check=target.batch_validator())]
        return minimize_function(lambda t: target.objective(target.space.unflatten(t), cached),
                                 start, self.grad_tol, self.max_iter).params

    def __repr__(self):
        return f"LBFGSRetrainer(grad_tol={self.grad_tol}, max_iter={self.max_iter})"


class SGDRetrainer:
    """Minibatch training of ``mean batch loss + R`` for ``epochs`` passes over the subset
    (:func:`influencekit.response.train`).

    Args:
        epochs: passes over the subset.
        lr: learning rate.
        batch_size: examples per step (the last batch of an epoch may be smaller).
        optimizer: ``"adam"``, ``"sgd"`` (with ``momentum``) or ``"normalized"``.
        dtype: dtype of training (default float32; results are returned in float64).

    The seed fixes the shuffling order, so the same (subset, seed, init) gives the same result.
    """

    def __init__(self, epochs: int = 20, lr: float = 1e-2, batch_size: int = 64,
                 optimizer: str = "adam", momentum: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        check_optimizer(optimizer)
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.momentum = momentum
        self.dtype = dtype

    def retrain(self, target, train, indices, *, seed=0, init=None, runtime=None):
        runtime = resolve_runtime(runtime)
        data = subset_data(train, indices, runtime)
        schedule = batch_schedule(num_examples(data), batch_size=self.batch_size, seed=seed,
                                  epochs=self.epochs)
        result = train_fn(target, data, schedule, optimizer=self.optimizer, lr=self.lr,
                          momentum=self.momentum, init=_start(target, init, self.dtype, runtime),
                          dtype=self.dtype, runtime=runtime.replace(progress=False))
        return result.params.to(torch.float64)

    def __repr__(self):
        return (f"SGDRetrainer(epochs={self.epochs}, lr={self.lr}, batch_size={self.batch_size}, "
                f"optimizer={self.optimizer!r}, momentum={self.momentum}, dtype={self.dtype})")


def leave_one_out_retrained(target: Target, train, indices, query, retrainer: Retrainer, *,
                            init: torch.Tensor | None = None, seed: int = 0,
                            reference: torch.Tensor | None = None,
                            runtime: Runtime | None = None) -> torch.Tensor:
    """Real change of f when each example in ``indices`` is left out, ``[n_query, k]``.

    Every run (the reference on all data and each leave-one-out run) starts from ``init``
    (default: the Target's parameters, a warm start; pass the original initialisation or zeros
    for a cold start) with the same ``seed``. The change is f(θ₋ₘ) − f(θ_ref), comparable with
    the removal effect +s/n of the conventions table. ``reference`` (flat ``[p]``) skips
    retraining on all the data.
    """
    runtime = resolve_runtime(runtime)
    n = num_examples(as_loader(train, runtime, "training data"))
    everyone = np.arange(n)
    if reference is None:
        reference = retrainer.retrain(target, train, everyone, seed=seed, init=init,
                                      runtime=runtime)
    f_ref = measure(target, reference.to(torch.float64), query, runtime)
    changes = []
    for m in runtime.bar(list(indices), desc="leave-one-out retraining"):
        keep = everyone[everyone != int(m)]
        theta = retrainer.retrain(target, train, keep, seed=seed, init=init, runtime=runtime)
        changes.append(measure(target, theta.to(torch.float64), query, runtime) - f_ref)
    return torch.stack(changes, dim=1)


def subset_retraining(target: Target, train, subsets, query, retrainer: Retrainer, *,
                      init: torch.Tensor | None = None, seeds=(0,), store=None, rows=None,
                      runtime: Runtime | None = None) -> np.ndarray:
    """Retrain on each subset and measure the query set: ``[n_subsets, n_query]`` (float64).

    ``subsets`` is a boolean mask ``[n_subsets, n_train]``. Each row is the measurement f of every
    query example, averaged over the models trained with ``seeds`` (all from ``init``).
    With ``store`` (a folder), each finished row is written to a resumable
    :class:`~influencekit.storage.ResultsArray`: a run interrupted part-way resumes at the first
    row not done, and a folder made for other subsets, query data, training data (values or
    labels, see :func:`~influencekit.storage.data_fingerprint`), model, init or retrainer raises
    ``StoreError``. ``rows`` (with ``store``): compute only these rows (e.g. one partition per
    process; processes on disjoint rows may share one store); rows of the store not computed by
    anyone yet hold zeros in the returned array.
    """
    from ..storage import ResultsArray, data_fingerprint

    runtime = resolve_runtime(runtime)
    masks = np.asarray(subsets, dtype=bool)
    n = num_examples(as_loader(train, runtime, "training data"))
    if masks.ndim != 2 or masks.shape[1] != n:
        raise ValueError(f"subsets must be a boolean mask [n_subsets, n_train = {n}], got "
                         f"shape {masks.shape}")
    n_query = num_examples(as_loader(query, runtime, "query data"))
    seeds = [int(s) for s in seeds]
    shape = (masks.shape[0], n_query)
    if store is None:
        if rows is not None:
            raise ValueError("rows= selects the rows of a shared store; pass store= as well")
        results, rows = np.zeros(shape), range(masks.shape[0])
        array = None
    else:
        config = {"kind": "subset_retraining", "subsets_sha256": _sha(masks.tobytes()),
                  "seeds": seeds, "retrainer": repr(retrainer),
                  "fingerprint": target.fingerprint(),
                  "training_data": data_fingerprint(train), "query_data": data_fingerprint(query),
                  "init_sha256": None if init is None else _sha(
                      torch.as_tensor(init).to(torch.float64).cpu().numpy().tobytes())}
        array = ResultsArray.open(store, shape, "float64", config)
        outside = [int(r) for r in (rows or ()) if not 0 <= int(r) < masks.shape[0]]
        if outside:
            raise ValueError(f"rows {outside[:5]} are outside the {masks.shape[0]} subsets")
        pending = set(array.pending())
        rows = sorted(pending if rows is None else pending & {int(r) for r in rows})
    for row in runtime.bar(list(rows), desc="subset retraining"):
        keep = np.flatnonzero(masks[row])
        values = [measure(target, retrainer.retrain(target, train, keep, seed=s, init=init,
                                                    runtime=runtime).to(torch.float64),
                          query, runtime) for s in seeds]
        value = torch.stack(values).mean(dim=0).cpu().numpy()
        if array is None:
            results[row] = value
        else:
            array.write(row, value)
    return results if array is None else array.values().copy()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
