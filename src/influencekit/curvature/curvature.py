"""Curvature: which matrix C is inverted — of the weighted-MEAN training loss plus ∇²R.

``C = (1 / Σw) Σ_i w_i C_i + ∇²R(θ̂)`` where C_i is, per ``kind``:

- ``"hessian"``: ∇²ℓ(z_i, θ̂);
- ``"ggn"``: J_iᵀ H_i J_i (Gauss-Newton: Jacobian of the outputs, Hessian of the loss in them);
- ``"fisher"``: E_{y ~ p_θ̂(·|x_i)} g gᵀ, computed EXACTLY by enumerating the task's predictive
  targets (all classes for classification, sigma points for squared error), or estimated from
  ``n_samples`` seeded draws per example where the distribution cannot be enumerated (a
  language model) or when ``n_samples`` is given (:mod:`.labels`);
- ``"empirical_fisher"``: g_i g_iᵀ with the true labels.

Per-example gradients come from the runtime's gradient engine (hooks / vmap / loop); the GGN and
Hessian from Jacobian- and Hessian-vector products of whole batches, so no per-example transform
of the model is needed (Hugging Face models with data-dependent mask code work).

A Curvature is a description (target, data, kind, weights); work happens in :meth:`dense` and
:meth:`matvec`, each given a Runtime. Under a Runtime with several processes (``context``) each
process sums its share of the training data's batches and the sums are all-reduced
(:mod:`.statistics`), so CG, LiSSA, Arnoldi and Exact run their products and matrices sharded;
every process must then make the same calls. :meth:`dense` can also write its sums chunk by
chunk to a :class:`~influencekit.storage.FitStore` and resume from it.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from ..errors import CurvatureTooLargeError, NonFiniteError
from ..func.products import (
    dense_ggn,
    dense_hessian,
    dense_outer,
    ggn_vector_products,
    hessian_vector_products,
    outer_vector_products,
)
from ..grads import (
    GradientEngine,
    HookIncompatibleError,
    as_loader,
    check_finite,
    check_weights,
    compute_dtype,
    iter_batches,
    num_examples,
    take,
)
from ..runtime import Runtime, resolve_runtime
from ..storage import FitStore, fingerprint
from .labels import LabelSets, resolve_label_mode
from .statistics import accumulate, store_config

KINDS = ("hessian", "ggn", "fisher", "empirical_fisher")


class Curvature:
    """The curvature of the training objective at the Target's current parameters.

    Args:
        target: model, task and parameters.
        data: the training data (DataLoader without shuffling, Dataset, tuple or dict of
            tensors).
        kind: one of ``"hessian"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``;
            ``None`` takes the task's ``default_curvature`` (``"ggn"`` for the built-in tasks).
        weights: optional per-example weights ``[n]`` of the weighted-mean loss (default ones).
        n_samples: for ``kind="fisher"``: labels drawn per example from the model (seeded by
            ``seed``) instead of the exact expectation. ``None`` (default): exact when the task
            enumerates its predictive distribution, else one sample.
        seed: seed of those draws (every pass over the data draws the same labels).
    """

    def __init__(self, target, data, kind: str | None = None, weights=None,
                 n_samples: int | None = None, seed: int = 0):
        self.target = target
        self.data = data
        self.kind = target.task.default_curvature if kind is None else kind
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {KINDS}")
        self.weights = weights
        self.n_samples = n_samples
        self.seed = seed

    # -- bookkeeping --------------------------------------------------------------------------
    def loader(self, runtime: Runtime):
        return as_loader(self.data, runtime, "training data")

    def num_examples(self, runtime: Runtime | None = None) -> int:
        return num_examples(self.loader(resolve_runtime(runtime)))

    def batch_grid(self, runtime: Runtime | None = None) -> int:
        """Examples per batch of the training data's loader (its own batch size for a
        DataLoader, else the runtime's): the unit in which passes are split over processes and
        into chunks."""
        loader = self.loader(resolve_runtime(runtime))
        return int(loader.batch_size or resolve_runtime(runtime).batch_size)

    def batches(self, runtime: Runtime, dtype: torch.dtype | None, rows: range | None = None,
                desc: str = ""):
        """Yield ``(start, batch, w [B])`` over the examples ``rows`` (default all; a range of
        whole batches of :meth:`batch_grid`), ``start`` being the position in the whole data; each
        batch is validated by the Target (:meth:`~influencekit.Target.batch_validator`)."""
        loader = self.loader(runtime)
        n = num_examples(loader)
        weights = check_weights(self.weights, n, runtime)
        check = self.target.batch_validator()
        if rows is None or (rows.start == 0 and rows.stop >= n):
            yield from iter_batches(loader, runtime, dtype, weights, desc=desc, check=check)
            return
        if not len(rows):
            return
        part = as_loader(take(self.data, rows, runtime, "training data"), runtime)
        part_weights = None if weights is None else weights[rows.start:rows.stop]
        for start, batch, w in iter_batches(part, runtime, dtype, part_weights, desc=desc,
                                            check=check):
            yield rows.start + start, batch, w

    def total_weight(self, runtime: Runtime | None = None) -> float:
        """Σ w_i, the n of the conventions table (the number of examples when unweighted)."""
        runtime = resolve_runtime(runtime)
        n = self.num_examples(runtime)
        w = check_weights(self.weights, n, runtime)
        return float(n if w is None else w.sum())

    def _setup(self, runtime: Runtime, at: torch.Tensor | None):
        dtype = compute_dtype(self.target, runtime)
        if at is None:
            flat = self.target.flat_params(dtype, runtime.device)
        else:
            if at.shape != (self.target.num_params,):
                raise ValueError(f"at= must be flat parameters [p] = [{self.target.num_params}],"
                                 f" got {tuple(at.shape)}")
            flat = at.detach().to(dtype=dtype, device=runtime.device)
        return dtype, flat

    # -- dense --------------------------------------------------------------------------------
    def check_dense_fits(self, runtime: Runtime | None = None) -> None:
        """Raise :class:`CurvatureTooLargeError` if ``[p, p]`` float64 exceeds the budget."""
        runtime = resolve_runtime(runtime)
        p = self.target.num_params
        need = p * p * 8
        if need > runtime.max_dense_bytes:
            raise CurvatureTooLargeError(
                f"a dense curvature for {p:,} parameters needs {need / 1e9:.1f} GB in float64, "
                f"over the budget of {runtime.max_dense_bytes / 1e9:.1f} GB "
                "(Runtime.max_dense_bytes). Use a matrix-free or factored inverse instead of "
                "Exact (ik.CG, ik.LiSSA, ik.Arnoldi, ik.EKFAC), or restrict the parameters with "
                "Target(params=[...]).")

    def dense(self, runtime: Runtime | None = None, *, at: torch.Tensor | None = None,
              store: FitStore | str | None = None) -> torch.Tensor:
        """The matrix C, ``[p, p]`` float64 (symmetrised), at the Target's parameters or at
        flat parameters ``at [p]``.

        ``store``: a :class:`~influencekit.storage.FitStore` (or folder) where the sums are
        written chunk by chunk (pass ``dense/``); a killed computation resumes from it and ends
        with the same bits.
        """
        runtime = resolve_runtime(runtime)
        self.check_dense_fits(runtime)
        dtype, flat = self._setup(runtime, at)
        p = flat.numel()
        labels = self._label_sets()
        engine = GradientEngine(self.target, runtime.engine)

        def zeros():
            return {"curvature": torch.zeros(p, p, dtype=torch.float64, device=runtime.device)}

        def add(rows, sums):
            weight = 0.0
            for start, batch, w in self.batches(runtime, dtype, rows, f"dense {self.kind}"):
                block = self._dense_batch(flat, batch, w, labels, engine, start)
                block = block.to(torch.float64)
                if not torch.isfinite(block).all():
                    self._raise_non_finite(flat, batch, start, engine)
                sums["curvature"] += block
                weight += float(w.sum())
            return weight

        store = FitStore.of(store)
        config = None
        if store is not None:
            config = {**store_config(self, runtime, dtype), "n_samples": self.n_samples,
                      "seed": self.seed,
                      "at": None if at is None else fingerprint(flat)}
        sums = accumulate(self, runtime, zeros, add, store=store, name="dense", config=config)
        total = sums.values["curvature"] / sums.weight
        total += self._regularizer_dense(flat).to(torch.float64)
        if not torch.isfinite(total).all():
            raise NonFiniteError("the curvature's regulariser term has non-finite entries; "
                                 "check the regulariser at the current parameters.")
        return 0.5 * (total + total.T)

    def _dense_batch(self, flat, batch, w, labels, engine, start: int) -> torch.Tensor:
        target, space = self.target, self.target.space
        if self.kind == "hessian":
            return dense_hessian(lambda f: (w * target.losses(space.unflatten(f), batch)).sum(),
                                 flat)
        if self.kind == "ggn":
            outputs_fn = lambda f: target.outputs(space.unflatten(f), batch)  # noqa: E731
            with torch.no_grad():
                targets = target.targets(batch, outputs_fn(flat))
            return dense_ggn(outputs_fn, self._loss_of_one, flat, targets, w)
        total = 0.0
        for grads, coef in self._label_gradients(flat, batch, labels.at(start), engine):
            total = total + dense_outer(grads, w * coef)
        return total

    def _regularizer_dense(self, flat):
        if self.target.regularizer is None:
            return torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype, device=flat.device)
        return dense_hessian(lambda f: self.target.regularization(self.target.space.unflatten(f)),
                             flat)

    # -- matrix-free --------------------------------------------------------------------------
    def matvec(self, vectors: torch.Tensor, runtime: Runtime | None = None, *,
               at: torch.Tensor | None = None) -> torch.Tensor:
        """C v for ``vectors [p]`` or ``[k, p]`` (same shape out), one pass over the data;
        at the Target's parameters or at flat parameters ``at [p]``."""
        runtime = resolve_runtime(runtime)
        dtype, flat = self._setup(runtime, at)
        single = vectors.dim() == 1
        vs = (vectors[None] if single else vectors).to(dtype=dtype, device=runtime.device)
        if not torch.isfinite(vs).all():
            raise NonFiniteError("the vectors given to Curvature.matvec hold NaN or infinite "
                                 "entries; the solver that called it diverged (raise damping) "
                                 "or its right-hand side is not finite.")
        labels = self._label_sets()
        engine = GradientEngine(self.target, runtime.engine)

        def add(rows, sums):
            weight = 0.0
            for start, batch, w in self.batches(runtime, dtype, rows, f"{self.kind} products"):
                part = self._matvec_batch(flat, batch, w, vs, labels, engine, start)
                if not torch.isfinite(part).all():
                    self._raise_non_finite(flat, batch, start, engine)
                sums["products"] += part
                weight += float(w.sum())
            return weight

        sums = accumulate(self, runtime, lambda: {"products": torch.zeros_like(vs)}, add)
        total = sums.values["products"] / sums.weight
        if self.target.regularizer is not None:
            reg = lambda f: self.target.regularization(self.target.space.unflatten(f))  # noqa: E731
            total += hessian_vector_products(reg, flat, vs)
        return total[0] if single else total

    def _matvec_batch(self, flat, batch, w, vs, labels, engine, start: int):
        target, space = self.target, self.target.space
        if self.kind == "hessian":
            return hessian_vector_products(
                lambda f: (w * target.losses(space.unflatten(f), batch)).sum(), flat, vs)
        if self.kind == "ggn":
            return ggn_vector_products(
                lambda f: target.outputs(space.unflatten(f), batch),
                lambda out: (w * target.loss_from_outputs(out, batch)).sum(), flat, vs)
        total = torch.zeros_like(vs)
        for grads, coef in self._label_gradients(flat, batch, labels.at(start), engine):
            total += outer_vector_products(grads, w * coef, vs)
        return total

    def iter_weighted_gradients(self, runtime: Runtime | None = None, *,
                                at: torch.Tensor | None = None):
        """For a Fisher kind: yield ``(coef [B], grads [B, p])`` over the data such that
        ``C = Σ coefᵢ gᵢ gᵢᵀ / Σw + ∇²R`` — per example and label set, ``coef = w_i · p(label)``
        and ``grads`` the loss gradients under those labels. Σw is :meth:`total_weight`."""
        if self.kind not in ("fisher", "empirical_fisher"):
            raise ValueError(f"iter_weighted_gradients needs a Fisher kind, not {self.kind!r}")
        runtime = resolve_runtime(runtime)
        dtype, flat = self._setup(runtime, at)
        labels = self._label_sets()
        engine = GradientEngine(self.target, runtime.engine)
        for start, batch, w in self.batches(runtime, dtype, desc=self.kind):
            for grads, coef in self._label_gradients(flat, batch, labels.at(start), engine):
                if not torch.isfinite(grads).all():
                    self._raise_non_finite(flat, batch, start, engine)
                yield w * coef, grads

    # -- shared pieces ------------------------------------------------------------------------
    def _loss_of_one(self, out, target):
        """The task's loss of one example from its outputs ``[*out]`` and target."""
        one = tree_map(lambda t: t.unsqueeze(0), target)
        outputs = out.unsqueeze(0)
        return self.target.check_per_example(self.target.task.loss(outputs, one), outputs,
                                             "loss")[0]

    def _raise_non_finite(self, flat, batch, start: int, engine) -> None:
        """Name the example of a batch whose curvature block is not finite: the first whose
        model output, loss or loss gradient is NaN or infinite (else the batch)."""
        target = self.target
        params = target.space.unflatten(flat)
        with torch.no_grad():
            outputs = target.outputs(params, batch)
            rows = ~torch.isfinite(outputs.reshape(outputs.shape[0], -1)).all(dim=1)
            if rows.any():
                i = int(rows.nonzero()[0, 0])
                raise NonFiniteError(
                    f"the model's output for example {start + i} is not finite, so the "
                    f"{self.kind} curvature is not; check that example's inputs, or compute in "
                    "float64 with Runtime(dtype=torch.float64).", index=start + i)
        values, grads = engine(params, batch, "loss")
        check_finite(values, target.space.flatten(grads, batch_dims=1), start, "loss")
        raise NonFiniteError(
            f"the {self.kind} curvature of the batch starting at example {start} has "
            "non-finite entries although every example's output, loss and gradient is finite "
            "(second derivatives overflow); compute in float64 with "
            "Runtime(dtype=torch.float64) or check the model's numerics there.", index=start)

    def label_mode(self) -> str:
        """``"exact"``, ``"sampled"`` or ``"empirical"``: how a Fisher kind takes its labels."""
        if self.kind == "fisher" and self.n_samples is not None:
            return resolve_label_mode(self.target.task, self.kind, "sampled")
        return resolve_label_mode(self.target.task, self.kind, "auto")

    def _label_sets(self) -> LabelSets | None:
        if self.kind not in ("fisher", "empirical_fisher"):
            return None
        return LabelSets(self.label_mode(), self.n_samples or 1, self.seed)

    def _label_gradients(self, flat, batch, labels: LabelSets, engine):
        """Yield ``(per-example gradients [B, p], label weights [B])`` whose weighted outer
        products give the Fisher's C_i for this batch."""
        target = self.target
        params = target.space.unflatten(flat)

        def target_sets(outputs, true_targets):
            return labels(target.task, outputs, true_targets)
        try:
            for coef, grads in engine.loss_gradients_per_target_set(params, batch, target_sets):
                yield target.space.flatten(grads, batch_dims=1), coef.to(flat.dtype)
        except HookIncompatibleError as exc:  # found on the first batch: redo it without
            if engine.engine != "auto":
                raise
            engine.demote(exc.module)
            yield from self._label_gradients(flat, batch, labels, engine)
