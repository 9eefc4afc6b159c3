"""Influence: scores of training examples on measurements, through any fitted inverse.

Shapes, sign and scale (see ``influencekit.conventions``):

- ``pairwise(query, train)`` -> ``[n_query, n_train]``, s = g_qᵀ (C + λI)⁻¹ g_m, no 1/n.
  With the loss as measurement, s > 0 means the training example helped (upweighting it lowers
  the query loss); the predicted change when it is removed is +s / n.
- ``pairwise_per_module(query, train)`` -> ``{module: [n_query, n_train]}``, the same score split
  by module (parameter-name prefix); the parts add up to ``pairwise``.
- ``self_influence(train)`` -> ``[n_train]``, g_mᵀ (C + λI)⁻¹ g_m ≥ 0 for a PSD curvature.
- ``parameter_influence(train)`` -> ``[n_train, p]``, ∂θ/∂w_m = −(1/n)(C + λI)⁻¹ g_m.

Training gradients are g_m = ∇ℓ(z_m) + ∇R(θ̂) (the regulariser gradient is included because the
loss is a weighted MEAN that renormalises when a weight changes); ``include_regularizer=False``
drops ∇R (the convention of codes that score with loss gradients only, e.g. kronfluence).

Under a Runtime with several processes (``Runtime.context``), query gradients, ``pairwise``
and ``self_influence`` are split over the processes' shares of the examples and gathered: every
process returns the whole result.

Before scoring, the Target's parameters are checked against the ones the inverse was fitted at
(a sha256 fingerprint): an inverse of another model, or of this model before further training,
is refused (``allow_other_model=True`` to reuse it on purpose, as an approximation).
"""

from __future__ import annotations

import torch

from ..errors import ModelMismatchError
from ..grads import compute_dtype, gradients, iter_gradients, sharded
from ..inverse.base import InverseCurvature
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target


class Influence:
    """Influence scores of a Target through a fitted inverse curvature.

    Args:
        target: model, task, parameters and regulariser.
        inverse: a fitted inverse of this Target's curvature.
        include_regularizer: training gradients g_m = ∇ℓ_m + ∇R (default, the conventions
            table) or ∇ℓ_m alone (False).
        allow_other_model: score even when the Target's parameters differ from those the
            inverse was fitted at (default: refuse with :class:`ModelMismatchError`).
    """

    def __init__(self, target: Target, inverse: InverseCurvature,
                 include_regularizer: bool = True, allow_other_model: bool = False):
        self.target = target
        self.inverse = inverse
        self.include_regularizer = include_regularizer
        self.allow_other_model = allow_other_model

    def _check(self):
        self.inverse.check_fitted()
        if self.inverse.param_space_ != self.target.space:
            raise ModelMismatchError(
                "the inverse was fitted for other parameters "
                f"({list(self.inverse.param_space_.names)[:4]}...) than this Target selects "
                f"({list(self.target.space.names)[:4]}...); fit it on a Curvature of this Target.")
        if not self.allow_other_model:
            fitted = self.inverse.fit_info_.get("fingerprint")
            if fitted is not None and fitted != self.target.fingerprint():
                raise ModelMismatchError(
                    "the inverse was fitted at other parameter values than the Target's model has "
                    "now (another model of the same shape, or this one trained further after "
                    "fitting): its curvature does not describe this model. Fit it again on "
                    "ik.Curvature(target, train), or pass Influence(..., "
                    "allow_other_model=True) to reuse it knowingly as an approximation.")

    def _train_stream(self, train, runtime, desc, reuse=False):
        """``(start, g_m [B, p])`` with or without ∇R (``include_regularizer``)."""
        yield from iter_gradients(self.target, train, runtime, of="loss", desc=desc,
                                  include_regularizer=self.include_regularizer, reuse=reuse)

    @property
    def n_train(self) -> float:
        """n of the conventions table: Σ w of the data the curvature was fitted on."""
        return self.inverse.n_train_

    # -- gradients ----------------------------------------------------------------------------
    def train_gradients(self, train, runtime: Runtime | None = None) -> torch.Tensor:
        """g_m = ∇ℓ(z_m) + ∇R (or ∇ℓ alone, ``include_regularizer=False``), ``[n_train, p]``."""
        return torch.cat([g for _, g in self._train_stream(train, runtime, "train gradients")])

    def query_gradients(self, query, runtime: Runtime | None = None) -> torch.Tensor:
        """g_q = ∇f(z_q) of the Task's measurement, ``[n_query, p]``."""
        return gradients(self.target, query, runtime, of="measurement", desc="query gradients")

    def precondition(self, query, runtime: Runtime | None = None) -> torch.Tensor:
        """(C + λI)⁻¹ g_q, ``[n_query, p]``."""
        self._check()
        return self.inverse.solve(self.query_gradients(query, runtime), runtime)

    # -- scores -------------------------------------------------------------------------------
    def pairwise(self, query, train, runtime: Runtime | None = None) -> torch.Tensor:
        """Scores ``[n_query, n_train]``: s = g_qᵀ (C + λI)⁻¹ g_m (sign and scale: module doc).

        Training gradients are streamed batch by batch; only the preconditioned queries are held.
        """
        runtime = resolve_runtime(runtime)
        pre = self.precondition(query, runtime)

        def scores(part, local):  # [n_query, n_part]
            return torch.cat([pre @ g.to(pre.dtype).T
                              for _, g in self._train_stream(part, local, "scoring train",
                                                             reuse=True)], dim=1)

        if not runtime.dist.is_distributed:
            return scores(train, runtime)
        # processes gather rows: one row per training example, then back to [n_query, n_train]
        rows = sharded(train, runtime, lambda part, local: scores(part, local).T.contiguous(),
                       lambda: pre.new_empty(0, pre.shape[0]), "training data")
        return rows.T.contiguous()

    def pairwise_per_module(self, query, train, runtime: Runtime | None = None
                            ) -> dict[str, torch.Tensor]:
        """Scores split by module: ``{module name: [n_query, n_train]}``, summing to ``pairwise``.

        Module name = parameter name without its last component (``"fc1.weight"`` -> ``"fc1"``).
        The term of module M is ``((C + λI)⁻¹ g_q)[M] · g_m[M]`` (same sign and scale as
        :meth:`pairwise`). For an inverse that is block diagonal per module (KFAC, EKFAC) this is
        ``g_q[M]ᵀ (C_MM + λI)⁻¹ g_m[M]``, the influence through that layer alone. For a full
        inverse (Exact, CG, ...) the preconditioned query is split AFTER solving, so a module's
        term also carries the curvature coupling to the other modules; the terms still add up.
        """
        runtime = resolve_runtime(runtime)
        pre = self.precondition(query, runtime)
        groups = module_positions(self.target.space)
        blocks = {name: [] for name in groups}
        for _, g in self._train_stream(train, runtime, "scoring train per module", reuse=True):
            g = g.to(pre.dtype)
            for name, idx in groups.items():
                blocks[name].append(pre[:, idx] @ g[:, idx].T)
        return {name: torch.cat(b, dim=1) for name, b in blocks.items()}

    def self_influence(self, train, runtime: Runtime | None = None) -> torch.Tensor:
        """g_mᵀ (C + λI)⁻¹ g_m for each training example, ``[n_train]``."""
        self._check()
        runtime = resolve_runtime(runtime)

        def values(part, local):
            return torch.cat([(self.inverse.solve(g, local) * g).sum(dim=1)
                              for _, g in self._train_stream(part, local, "self-influence",
                                                             reuse=True)])

        def empty():
            return torch.empty(0, dtype=compute_dtype(self.target, runtime),
                               device=runtime.device)

        return sharded(train, runtime, values, empty, "training data")

    def parameter_influence(self, train, runtime: Runtime | None = None) -> torch.Tensor:
        """∂θ/∂w_m = −(1/n)(C + λI)⁻¹ g_m for each example, ``[n_train, p]``."""
        self._check()
        return -self.inverse.solve(self.train_gradients(train, runtime), runtime) / self.n_train

    def hypothetical(self, query, examples, runtime: Runtime | None = None) -> torch.Tensor:
        """Scores ``[n_query, k]`` of k examples that are NOT in the training set.

        ``examples`` is data in the same layout as the training data (e.g. a tuple ``(x, y)`` of
        tensors with k rows). The score has the same meaning as in :meth:`pairwise`: −s/n is the
        first-order change of f per unit of weight given to the new example.
        """
        return self.pairwise(query, examples, runtime)


def module_positions(space) -> dict[str, torch.Tensor]:
    """``{module name: flat positions}`` grouping parameters by their module (name prefix)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for (name, sl) in space.slices().items():
        module = name.rpartition(".")[0] or name
        groups.setdefault(module, []).append(torch.arange(sl.start, sl.stop))
    return {m: torch.cat(parts) for m, parts in groups.items()}
