"""Curvature: which matrix C is inverted — of the weighted-MEAN training loss plus ∇²R.

``C = (1 / Σw) Σ_i w_i C_i + ∇²R(θ̂)`` where C_i is, per ``kind``:

- ``"hessian"``: ∇²ℓ(z_i, θ̂);
- ``"ggn"``: J_iᵀ H_i J_i (Gauss-Newton: Jacobian of the outputs, Hessian of the loss in them);
- ``"fisher"``: E_{y ~ p_θ̂(·|x_i)} g gᵀ, computed EXACTLY by enumerating the task's predictive
  targets (all classes for classification, sigma points for squared error);
- ``"empirical_fisher"``: g_i g_iᵀ with the true labels.

A Curvature is a description (target, data, kind, weights); work happens in :meth:`dense` and
:meth:`matvec`, each given a Runtime.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from ..errors import CurvatureTooLargeError, NonFiniteError
from ..func.grads import per_example_gradients
from ..func.products import (
    dense_ggn,
    dense_hessian,
    dense_outer,
    ggn_vector_products,
    hessian_vector_products,
    outer_vector_products,
)
from ..grads.data import as_loader, batches, check_weights, num_examples
from ..grads.stream import compute_dtype
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target, _cast_floating

KINDS = ("hessian", "ggn", "fisher", "empirical_fisher")


class Curvature:
    """The curvature of the training objective at the Target's current parameters.

    Args:
        target: model, task and parameters.
        data: the training data (DataLoader without shuffling, Dataset or tuple of tensors).
        kind: one of ``"hessian"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``.
        weights: optional per-example weights ``[n]`` of the weighted-mean loss (default ones).
    """

    def __init__(self, target: Target, data, kind: str = "ggn", weights=None):
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {KINDS}")
        self.target = target
        self.data = data
        self.kind = kind
        self.weights = weights

    # -- bookkeeping --------------------------------------------------------------------------
    def loader(self, runtime: Runtime):
        return as_loader(self.data, runtime, "training data")

    def num_examples(self, runtime: Runtime | None = None) -> int:
        return num_examples(self.loader(resolve_runtime(runtime)))

    def total_weight(self, runtime: Runtime | None = None) -> float:
        """Σ w_i, the n of the conventions table (the number of examples when unweighted)."""
        runtime = resolve_runtime(runtime)
        n = self.num_examples(runtime)
        w = check_weights(self.weights, n, runtime)
        return float(n if w is None else w.sum())

    def _setup(self, runtime: Runtime, at: torch.Tensor | None):
        dtype = compute_dtype(self.target, runtime)
        loader = self.loader(runtime)
        weights = check_weights(self.weights, num_examples(loader), runtime)
        if at is None:
            flat = self.target.flat_params(dtype, runtime.device)
        else:
            if at.shape != (self.target.num_params,):
                raise ValueError(f"at= must be flat parameters [p] = [{self.target.num_params}],"
                                 f" got {tuple(at.shape)}")
            flat = at.detach().to(dtype=dtype, device=runtime.device)
        return dtype, loader, weights, flat

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

    def dense(self, runtime: Runtime | None = None, *, at: torch.Tensor | None = None
              ) -> torch.Tensor:
        """The matrix C, ``[p, p]`` float64 (symmetrised), at the Target's parameters or at
        flat parameters ``at [p]``."""
        runtime = resolve_runtime(runtime)
        self.check_dense_fits(runtime)
        dtype, loader, weights, flat = self._setup(runtime, at)
        p = flat.numel()
        total = torch.zeros(p, p, dtype=torch.float64, device=runtime.device)
        weight_sum = 0.0
        for _, batch, w in batches(loader, runtime, dtype, weights, desc=f"dense {self.kind}"):
            total += self._dense_batch(flat, batch, w).to(torch.float64)
            weight_sum += float(w.sum())
        total /= weight_sum
        total += self._regularizer_dense(flat).to(torch.float64)
        if not torch.isfinite(total).all():
            raise NonFiniteError("the curvature has non-finite entries; check the model's "
                                 "numerics at the current parameters or compute in float64.")
        return 0.5 * (total + total.T)

    def _dense_batch(self, flat, batch, w) -> torch.Tensor:
        target, space = self.target, self.target.space
        if self.kind == "hessian":
            return dense_hessian(lambda f: (w * target.losses(space.unflatten(f), batch)).sum(),
                                 flat)
        inputs, targets = self._inputs_targets(batch, flat.dtype)
        if self.kind == "ggn":
            def outputs_one(f, example):
                x = tree_map(lambda t: t.unsqueeze(0), example[0])
                return target.outputs_from_inputs(space.unflatten(f), x)[0]

            def loss_one(out, example):
                y = tree_map(lambda t: t.unsqueeze(0), example[1])
                return target.task.loss(out.unsqueeze(0), y)[0]
            return dense_ggn(outputs_one, loss_one, flat, (inputs, targets), w)
        total = 0.0
        for labels, probs in self._label_sets(flat, inputs, targets):
            grads = self._per_example_grads(flat, inputs, labels)
            total = total + dense_outer(grads, w * probs)
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
        dtype, loader, weights, flat = self._setup(runtime, at)
        single = vectors.dim() == 1
        vs = (vectors[None] if single else vectors).to(dtype=dtype, device=runtime.device)
        total = torch.zeros_like(vs)
        weight_sum = 0.0
        for _, batch, w in batches(loader, runtime, dtype, weights, desc=f"{self.kind} products"):
            total += self._matvec_batch(flat, batch, w, vs)
            weight_sum += float(w.sum())
        total /= weight_sum
        if self.target.regularizer is not None:
            reg = lambda f: self.target.regularization(self.target.space.unflatten(f))  # noqa: E731
            total += hessian_vector_products(reg, flat, vs)
        return total[0] if single else total

    def _matvec_batch(self, flat, batch, w, vs):
        target, space = self.target, self.target.space
        if self.kind == "hessian":
            return hessian_vector_products(
                lambda f: (w * target.losses(space.unflatten(f), batch)).sum(), flat, vs)
        inputs, targets = self._inputs_targets(batch, flat.dtype)
        if self.kind == "ggn":
            return ggn_vector_products(
                lambda f: target.outputs_from_inputs(space.unflatten(f), inputs),
                lambda out: (w * target.task.loss(out, targets)).sum(), flat, vs)
        total = torch.zeros_like(vs)
        for labels, probs in self._label_sets(flat, inputs, targets):
            grads = self._per_example_grads(flat, inputs, labels)
            total += outer_vector_products(grads, w * probs, vs)
        return total

    # -- shared pieces ------------------------------------------------------------------------
    def _inputs_targets(self, batch, dtype):
        task = self.target.task
        targets = task.targets(batch)
        device = targets.device if isinstance(targets, torch.Tensor) else None
        return task.inputs(batch), _cast_floating(targets, dtype, device)

    def _label_sets(self, flat, inputs, targets):
        """(labels, probabilities [B]) pairs whose weighted outer products give C_i."""
        if self.kind == "empirical_fisher":
            yield targets, torch.ones(_len(targets), dtype=flat.dtype, device=flat.device)
            return
        with torch.no_grad():
            outputs = self.target.outputs_from_inputs(self.target.space.unflatten(flat), inputs)
        labels, probs = self.target.task.predictive_targets(outputs)
        for s, lab in enumerate(labels):
            yield lab, probs[s].to(flat.dtype)

    def _per_example_grads(self, flat, inputs, labels) -> torch.Tensor:
        target = self.target

        def loss_with(params, example):
            return target.task.loss(target.outputs_from_inputs(params, example[0]), example[1])
        params = target.space.unflatten(flat)
        _, grads = per_example_gradients(loss_with, params, (inputs, labels))
        return target.space.flatten(grads, batch_dims=1)


def _len(t) -> int:
    return t.shape[0] if isinstance(t, torch.Tensor) else len(t)
