"""Influence: scores of training examples on measurements, through any fitted inverse.

Shapes, sign and scale (see ``influencekit.conventions``):

- ``pairwise(query, train)`` -> ``[n_query, n_train]``, s = g_qᵀ (C + λI)⁻¹ g_m, no 1/n.
  With the loss as measurement, s > 0 means the training example helped (upweighting it lowers
  the query loss); the predicted change when it is removed is +s / n.
- ``pairwise_per_module(query, train)`` -> ``{module: [n_query, n_train]}``, the same score split
  by module (parameter-name prefix); the parts add up to ``pairwise``.
- ``self_influence(train)`` -> ``[n_train]``, g_mᵀ (C + λI)⁻¹ g_m ≥ 0 for a PSD curvature.
- ``parameter_influence(train)`` -> ``[n_train, p]``, ∂θ/∂w_m = −(1/n)(C + λI)⁻¹ g_m.
- ``pairwise_per_train_token(query, train)`` -> :class:`TokenScores` (``tokens [n_query, n_train,
  T]`` + ``rest [n_query, n_train]``), the score split over the training sequence's tokens.
- ``pairwise_per_query_token(query, train)`` -> ``[n_query, n_train, T]``, the score split over
  the query's measured tokens (completion tokens of a causal LM); sums to ``pairwise``.

Two paths to the same numbers (DESIGN.md): the FLAT path forms per-example gradients ``[B, p]``
and solves ``[n_query, p]``; the FACTORED path (:mod:`influencekit.scoring.factored`) solves the
queries block by block (``InverseCurvature.solve_per_parameter``) and scores each training batch
from its layers' activations and output gradients, never forming ``[B, p]``. ``path="auto"``
(default) takes the factored path for block-diagonal inverses (``parameter_blocks_()`` is not
None: KFAC, EKFAC, Diagonal, Identity, block_diagonal) and the flat path for full ones (Exact,
CG, LiSSA, Arnoldi). ``query_rank=r`` (factored path) keeps the best rank-r approximation of each
layer's preconditioned query (query batching: many queries scored in one cheap pass).

Training gradients are g_m = ∇ℓ(z_m) + ∇R(θ̂) (the regulariser gradient is included because the
loss is a weighted MEAN that renormalises when a weight changes); ``include_regularizer=False``
drops ∇R (the convention of codes that score with loss gradients only, e.g. kronfluence).

Before scoring, the Target's parameters are checked against the ones the inverse was fitted at
(a sha256 fingerprint): an inverse of another model, or of this model before further training,
is refused (``allow_other_model=True`` to reuse it on purpose, as an approximation).
"""

from __future__ import annotations

import torch

from ..errors import InfluenceKitError, ModelMismatchError
from ..grads import iter_gradients
from ..inverse.base import InverseCurvature
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target
from .factored import (
    PreparedQueries,
    TokenScores,
    pairwise_factored,
    per_module_factored,
    prepare_queries,
    prepare_token_queries,
    self_influence_factored,
    train_token_factored,
)

PATHS = ("auto", "factored", "flat")


class Influence:
    """Influence scores of a Target through a fitted inverse curvature.

    Args:
        target: model, task, parameters and regulariser.
        inverse: a fitted inverse of this Target's curvature.
        include_regularizer: training gradients g_m = ∇ℓ_m + ∇R (default, the conventions
            table) or ∇ℓ_m alone (False).
        allow_other_model: score even when the Target's parameters differ from those the
            inverse was fitted at (default: refuse with :class:`ModelMismatchError`).
        query_rank: query batching: replace each layer's preconditioned query ``[d_out,
            width]`` by its best rank-r approximation (SVD). ``None`` (default): exact. Changes
            the scores (see :func:`~influencekit.scoring.query_rank_correlation`); factored
            path only.
        path: ``"auto"`` (factored for block-diagonal inverses, else flat), ``"factored"`` or
            ``"flat"`` (module docstring). Both give the same scores up to rounding.
    """

    def __init__(self, target: Target, inverse: InverseCurvature,
                 include_regularizer: bool = True, allow_other_model: bool = False,
                 query_rank: int | None = None, path: str = "auto"):
        self.target = target
        self.inverse = inverse
        self.include_regularizer = include_regularizer
        self.allow_other_model = allow_other_model
        self.query_rank = query_rank
        self.path = path

    @property
    def factored(self) -> bool:
        """Whether scores take the factored path (``path``, and for ``"auto"`` whether the
        fitted inverse is block diagonal)."""
        if self.path not in PATHS:
            raise InfluenceKitError(f"path={self.path!r} is not one of {PATHS}")
        if self.query_rank is not None:
            if self.path == "flat":
                raise InfluenceKitError("query_rank needs the factored path; use path='auto' or "
                                        "'factored' (or query_rank=None for flat scores).")
            if isinstance(self.query_rank, bool) or not isinstance(self.query_rank, int) \
                    or self.query_rank < 1:
                raise InfluenceKitError(f"query_rank must be a positive integer or None, got "
                                        f"{self.query_rank!r}")
            return True
        if self.path != "auto":
            return self.path == "factored"
        self.inverse.check_fitted()
        return self.inverse.parameter_blocks_() is not None

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
        blocks = iter_gradients(self.target, query, runtime, of="measurement",
                                desc="query gradients")
        return torch.cat([g for _, g in blocks])

    def precondition(self, query, runtime: Runtime | None = None) -> torch.Tensor:
        """(C + λI)⁻¹ g_q, ``[n_query, p]``."""
        self._check()
        return self.inverse.solve(self.query_gradients(query, runtime), runtime)

    # -- scores -------------------------------------------------------------------------------
    def prepare_queries(self, query, runtime: Runtime | None = None) -> PreparedQueries:
        """``(C + λI)⁻¹ g_q`` per layer (rank ``query_rank``), to score against several training
        sets with :meth:`pairwise_prepared` without recomputing the queries."""
        runtime = resolve_runtime(runtime)
        self._check()
        return prepare_queries(self.target, self.inverse, query, runtime, rank=self.query_rank,
                               include_regularizer=self.include_regularizer)

    def pairwise_prepared(self, prepared: PreparedQueries, train,
                          runtime: Runtime | None = None) -> torch.Tensor:
        """Scores ``[n_query, n_train]`` of queries from :meth:`prepare_queries` (factored)."""
        return pairwise_factored(prepared, self.target, train, resolve_runtime(runtime))

    def pairwise(self, query, train, runtime: Runtime | None = None) -> torch.Tensor:
        """Scores ``[n_query, n_train]``: s = g_qᵀ (C + λI)⁻¹ g_m (sign and scale: module doc).

        Training gradients are streamed batch by batch; only the preconditioned queries are held.
        """
        runtime = resolve_runtime(runtime)
        if self.factored:
            return self.pairwise_prepared(self.prepare_queries(query, runtime), train, runtime)
        pre = self.precondition(query, runtime)
        blocks = [pre @ g.to(pre.dtype).T
                  for _, g in self._train_stream(train, runtime, "scoring train", reuse=True)]
        return torch.cat(blocks, dim=1)

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
        if self.factored:
            return per_module_factored(self.prepare_queries(query, runtime), self.target, train,
                                       runtime)
        pre = self.precondition(query, runtime)
        groups = module_positions(self.target.space)
        blocks = {name: [] for name in groups}
        for _, g in self._train_stream(train, runtime, "scoring train per module", reuse=True):
            g = g.to(pre.dtype)
            for name, idx in groups.items():
                blocks[name].append(pre[:, idx] @ g[:, idx].T)
        return {name: torch.cat(b, dim=1) for name, b in blocks.items()}

    def self_influence(self, train, runtime: Runtime | None = None) -> torch.Tensor:
        """g_mᵀ (C + λI)⁻¹ g_m for each training example, ``[n_train]``.

        Factored path: per inverse block, only that block's per-example gradients are formed."""
        self._check()
        runtime = resolve_runtime(runtime)
        if self.factored and self.inverse.parameter_blocks_() is not None:
            return self_influence_factored(self.target, self.inverse, train, runtime,
                                           include_regularizer=self.include_regularizer)
        out = []
        for _, g in self._train_stream(train, runtime, "self-influence", reuse=True):
            out.append((self.inverse.solve(g, runtime) * g).sum(dim=1))
        return torch.cat(out)

    def pairwise_per_train_token(self, query, train,
                                 runtime: Runtime | None = None) -> TokenScores:
        """Scores split over the tokens of each training sequence (always factored).

        Returns :class:`~influencekit.scoring.TokenScores`: ``tokens [n_query, n_train, T]``,
        the part of s that flows through training token t (``Σ_layers δ_tᵀ Q a_t``; zero on
        padding), and ``rest [n_query, n_train]`` (layers without the sequence's token
        dimension, flat parameters, ∇R); ``tokens.sum(-1) + rest`` equals :meth:`pairwise`.
        Same sign and scale as :meth:`pairwise`.
        """
        runtime = resolve_runtime(runtime)
        return train_token_factored(self.prepare_queries(query, runtime), self.target, train,
                                    runtime)

    def pairwise_per_query_token(self, query, train,
                                 runtime: Runtime | None = None) -> torch.Tensor:
        """Scores split over the query's tokens: ``[n_query, n_train, T]`` (always factored).

        Entry ``[q, m, τ]`` is ``∇f_{q,τ}ᵀ (C + λI)⁻¹ g_m`` where ``f_{q,τ}`` is token τ's term of
        the query's measurement (``Task.token_measurements``; for a causal LM the negative
        log-probability of completion token τ, zero on the prompt and padding), so the last
        dimension sums to :meth:`pairwise`. T = the longest query; costs one backward pass per
        query position, and each (query, token) is preconditioned like a query.
        """
        runtime = resolve_runtime(runtime)
        self._check()
        prepared, rows, length = prepare_token_queries(
            self.target, self.inverse, query, runtime, rank=self.query_rank,
            include_regularizer=self.include_regularizer)
        flat = pairwise_factored(prepared, self.target, train, runtime)
        n_query = max(q for q, _ in rows) + 1
        out = flat.new_zeros(n_query, flat.shape[1], length)
        index = torch.tensor(rows, device=flat.device)
        out[index[:, 0], :, index[:, 1]] = flat
        return out

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
