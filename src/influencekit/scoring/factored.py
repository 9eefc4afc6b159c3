"""Factored scoring: scores from each layer's activations and output gradients, no ``[B, p]``.

A Kronecker layer's per-example gradient is ``G_m = Σ_t δ_t a_tᵀ`` (``a [B, T, width]`` the
inputs with a trailing 1 for the bias, ``δ [B, T, d_out]`` the output gradients of the
training loss; :mod:`influencekit.grads.layers`). With the preconditioned query of that layer
``Q = ((C + λI)⁻¹ g_q)`` in the same ``[d_out, width]`` layout, the layer's part of the score is

    s_M = ⟨Q, G_m⟩ = Σ_t δ_tᵀ Q a_t,

so a training batch is scored from ONE hooked forward and backward pass: per layer, either the
per-example gradient matrices (``B·d_out·width`` numbers, in chunks) against all queries, or the
terms ``δ_tᵀ Q a_t`` token by token (which also gives token-wise scores). An ``nn.Embedding``
reads columns of Q at the token ids (its one-hot inputs are never formed); LayerNorm / RMSNorm
terms are ``Σ_t δ_t · (Q_w ⊙ x̂_t + Q_b)``; parameters no hook can handle are scored from their
flat per-example gradients (vmap or a loop, usually a few thousand numbers).

Query batching: each layer's ``Q`` of each query is replaced by its best rank-r approximation
``U_r S_r V_rᵀ`` (SVD), and the layer's term becomes ``Σ_t Σ_k (δ_t·u_k)(a_t·v_k)`` for all queries
at once; at r = min(d_out, width) it is exact.

Everything here is the same score as :meth:`Influence.pairwise` (``s = g_qᵀ (C + λI)⁻¹ g_m``, no
1/n, ``[n_query, n_train]``; s > 0: the training example helped lower the query's loss); the
parts (modules, tokens) add up to it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import InfluenceKitError, NonFiniteError
from ..grads import (
    DIAGONAL_KINDS,
    GradientEngine,
    HookIncompatibleError,
    Layer,
    LayerPass,
    as_loader,
    broadcast_input_error,
    compute_dtype,
    iter_batches,
    layer_activations,
    layer_matrix,
    layer_output_grads,
    layer_parameters,
    live_params,
    normalized_inputs,
    per_example_layer_grads,
    regularizer_gradient,
)
from ..runtime import Runtime, release_freed_memory
from ..task.target import Target

#: Elements of one chunk of per-example gradient matrices ``[b, d_out, width]`` (and of the
#: ``[n_query, b, T, d_out]`` token products); larger layers are scored in chunks of examples.
CHUNK_ELEMENTS = 1 << 24


def module_of(name: str) -> str:
    """The module a parameter belongs to: its name without the last component."""
    return name.rpartition(".")[0] or name


# -- preconditioned queries, per layer ------------------------------------------------------------
@dataclass
class KroneckerQuery:
    """A Kronecker layer's preconditioned queries: ``full [n_q, d_out, width]`` (Q in the
    gradient-matrix layout) or, after query batching, ``left [n_q, d_out, r]`` (U·S) and
    ``right [n_q, width, r]`` (V) with ``Q ≈ left @ rightᵀ``."""

    layer: Layer
    module: str
    full: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    @property
    def n_query(self) -> int:
        return (self.full if self.full is not None else self.left).shape[0]

    def dense(self) -> torch.Tensor:
        """``[n_q, d_out, width]`` (reconstructed from the factors after query batching)."""
        if self.full is not None:
            return self.full
        return self.left @ self.right.transpose(1, 2)


@dataclass
class DiagonalQuery:
    """A LayerNorm / RMSNorm layer's preconditioned queries ``[n_q, d]`` (weight, bias)."""

    layer: Layer
    module: str
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def n_query(self) -> int:
        return (self.weight if self.weight is not None else self.bias).shape[0]


@dataclass
class FlatQuery:
    """Preconditioned queries ``[n_q, p_M]`` of parameters outside any hooked layer (one
    module's), scored against flat per-example gradients."""

    names: tuple[str, ...]
    module: str
    flat: torch.Tensor

    @property
    def n_query(self) -> int:
        return self.flat.shape[0]


@dataclass
class PreparedQueries:
    """Preconditioned queries ``(C + λI)⁻¹ g_q`` held per layer, ready to score training data.

    Attributes:
        terms: one entry per scored part (:class:`KroneckerQuery`, :class:`DiagonalQuery`,
            :class:`FlatQuery`).
        hooked: the layers scored through hooks (each term of the first two kinds names one).
        rest: parameter names scored from flat per-example gradients.
        regularizer: ``{module: [n_q]}`` = ``((C + λI)⁻¹ g_q)[M]ᵀ ∇R[M]``, added to every
            training example's score when training gradients include ∇R (empty otherwise).
        rank: the query-batching rank r, or None (full rank).
        rest_engine: the gradient engine for the rest's per-example gradients.
        expanded: hooked layers whose input is shared by the batch (position ids ``[1, T]``)
            and whose output is expanded per example (:class:`~influencekit.grads.LayerPass`).
    """

    terms: list
    hooked: list[Layer]
    rest: list[str]
    regularizer: dict[str, torch.Tensor]
    rank: int | None = None
    rest_engine: str = "auto"
    expanded: frozenset = frozenset()

    @property
    def n_query(self) -> int:
        return self.terms[0].n_query

    def regularizer_total(self, dtype, device) -> torch.Tensor:
        """``[n_q]``: the regulariser's part of every training example's score."""
        total = torch.zeros(self.n_query, dtype=dtype, device=device)
        for value in self.regularizer.values():
            total = total + value.to(dtype=dtype, device=device)
        return total

    @property
    def modules(self) -> list[str]:
        """Module names of the parts, in order of first appearance."""
        return list(dict.fromkeys(t.module for t in self.terms))

    def dense_per_parameter(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """``{parameter: [n_q, *shape]}``: the (rank-r) preconditioned queries per parameter.
        Tied parameters appear in two layers with the same values; the first is kept."""
        out: dict[str, torch.Tensor] = {}
        for term in self.terms:
            if isinstance(term, KroneckerQuery):
                for name, value in layer_parameters(term.layer, term.dense(), shapes).items():
                    out.setdefault(name, value)
            elif isinstance(term, DiagonalQuery):
                for name, value in ((term.layer.weight, term.weight),
                                    (term.layer.bias, term.bias)):
                    if name:
                        out.setdefault(name, value.reshape(value.shape[0], *shapes[name]))
            else:
                start = 0
                for name in term.names:
                    size = int(torch.Size(shapes[name]).numel())
                    out.setdefault(name, term.flat[:, start:start + size].reshape(
                        term.flat.shape[0], *shapes[name]))
                    start += size
        return out


def concat_queries(parts: list[PreparedQueries]) -> PreparedQueries:
    """Queries prepared in several batches, as one (same layers, queries stacked in order)."""
    first = parts[0]
    for other in parts[1:]:
        if [layer.name for layer in other.hooked] != [layer.name for layer in first.hooked] \
                or other.rest != first.rest:
            raise InfluenceKitError(
                "the layers that hooks can handle changed between query batches (a module "
                "became incompatible with hooks on a later batch); score with "
                "Runtime(engine='vmap') or 'loop', or Influence(..., path='flat').")
    terms = []
    for i, term in enumerate(first.terms):
        fields = {}
        for f in dataclasses.fields(term):
            value = getattr(term, f.name)
            if isinstance(value, torch.Tensor):
                value = torch.cat([getattr(p.terms[i], f.name) for p in parts])
            fields[f.name] = value
        terms.append(type(term)(**fields))
    regularizer = {m: torch.cat([p.regularizer[m] for p in parts]) for m in first.regularizer}
    expanded = frozenset().union(*(p.expanded for p in parts))
    return dataclasses.replace(first, terms=terms, regularizer=regularizer, expanded=expanded)


def build_queries(pre: dict[str, torch.Tensor], hooked: list[Layer], rest: list[str],
                  shapes: dict[str, tuple[int, ...]], regularizer: dict[str, torch.Tensor],
                  rank: int | None = None, rest_engine: str = "auto") -> PreparedQueries:
    """Per-layer terms from preconditioned queries given per parameter ``{name: [n_q, *shape]}``.

    A Kronecker layer whose weight and bias belong to different modules (a tied weight with its
    own bias) is split into a weight part and a bias part, so per-module scores stay exact.
    ``rank``: keep the best rank-r approximation of each Kronecker layer's Q (SVD).
    """
    terms = [t for layer in hooked for t in layer_terms(layer, pre, rank)]
    terms += flat_terms(rest, pre)
    return PreparedQueries(terms, list(hooked), list(rest), regularizer, rank, rest_engine)


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype preconditioned queries are held and scores summed in: the gradients' dtype,
    at least float32 (a bfloat16 / float16 model's scores are not summed in 8-bit mantissas)."""
    return torch.promote_types(dtype, torch.float32)


def layer_terms(layer: Layer, pre: dict[str, torch.Tensor], rank: int | None) -> list:
    """The query terms of one hooked layer (see :func:`build_queries`), in
    :func:`score_dtype`."""
    terms = []
    for part in _module_parts(layer):
        module = module_of(part.weight or part.bias)
        if part.kind in DIAGONAL_KINDS:
            n = pre[part.weight or part.bias].shape[0]

            def vector(name, n=n):
                return pre[name].reshape(n, -1).to(score_dtype(pre[name].dtype))
            terms.append(DiagonalQuery(part, module, vector(part.weight) if part.weight else None,
                                       vector(part.bias) if part.bias else None))
            continue
        q = layer_matrix(part, pre)
        q = q.to(score_dtype(q.dtype))
        if rank is None:
            terms.append(KroneckerQuery(part, module, full=q.contiguous()))
        else:
            left, right = low_rank(q, rank)
            terms.append(KroneckerQuery(part, module, left=left, right=right))
    return terms


def flat_terms(rest: list[str], pre: dict[str, torch.Tensor]) -> list[FlatQuery]:
    """One :class:`FlatQuery` per module of the parameters scored from flat gradients."""
    by_module: dict[str, list[str]] = {}
    for name in rest:
        by_module.setdefault(module_of(name), []).append(name)
    terms = []
    for module, names in by_module.items():
        n = pre[names[0]].shape[0]
        flat = torch.cat([pre[name].reshape(n, -1) for name in names], dim=1)
        terms.append(FlatQuery(tuple(names), module, flat.to(score_dtype(flat.dtype))))
    return terms


def solve_into_terms(inverse, grads: dict[str, torch.Tensor], hooked: list[Layer],
                     rest: list[str], rank: int | None, runtime: Runtime,
                     reg: dict[str, torch.Tensor] | None) -> tuple[list, dict]:
    """``(terms, regularizer parts)`` from query gradients ``{name: [n_q, *shape]}``, solved one
    inverse block at a time; each layer's terms are built as soon as its parameters are solved
    and the per-parameter solutions dropped once no layer needs them (``grads`` is emptied), so
    the peak is about one copy of the queries. The terms come in ``hooked`` order, then the
    flat ones."""
    blocks = inverse.parameter_blocks_() or [tuple(grads)]
    users: dict[str, int] = {}
    for layer in hooked:
        for name in (layer.weight, layer.bias):
            if name:
                users[name] = users.get(name, 0) + 1
    for name in rest:
        users[name] = users.get(name, 0) + 1
    pre: dict[str, torch.Tensor] = {}
    built: dict[int, list] = {}
    parts: dict[str, torch.Tensor] = {}
    for block in blocks:
        solved = inverse.solve_per_parameter({n: grads.pop(n) for n in block}, runtime)
        for name, value in solved.items():
            if reg is not None:
                term = value.reshape(value.shape[0], -1) @ reg[name].reshape(-1).to(value.dtype)
                module = module_of(name)
                parts[module] = term if module not in parts else parts[module] + term
        pre.update(solved)
        del solved
        for i, layer in enumerate(hooked):
            names = [n for n in (layer.weight, layer.bias) if n]
            if i in built or not all(n in pre for n in names):
                continue
            built[i] = layer_terms(layer, pre, rank)
            for name in names:
                users[name] -= 1
                if users[name] == 0:
                    del pre[name]
    terms = [t for i in range(len(hooked)) for t in built[i]] + flat_terms(rest, pre)
    return terms, parts


def low_rank(q: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-r factors of each ``q [n, d_out, width]``: ``(U_r S_r [n, d_out, r],
    V_r [n, width, r])`` from the SVD (float64 for float64 input, else float32 at least)."""
    if rank < 1:
        raise InfluenceKitError(f"query_rank must be a positive integer, got {rank}")
    work = torch.promote_types(q.dtype, torch.float32)
    u, s, vh = torch.linalg.svd(q.to(work), full_matrices=False)
    r = min(rank, s.shape[-1])
    left = (u[..., :r] * s[..., None, :r]).to(q.dtype)
    right = vh[..., :r, :].transpose(1, 2).to(q.dtype)
    return left.contiguous(), right.contiguous()


def _module_parts(layer: Layer) -> list[Layer]:
    if layer.weight and layer.bias and module_of(layer.weight) != module_of(layer.bias):
        return [dataclasses.replace(layer, bias=None), dataclasses.replace(layer, weight=None)]
    return [layer]


# -- the query side -------------------------------------------------------------------------------
def prepare_queries(target: Target, inverse, query, runtime: Runtime, *, of="measurement",
                    rank: int | None = None, include_regularizer: bool = True,
                    desc: str = "query gradients") -> PreparedQueries:
    """``(C + λI)⁻¹ g_q`` of every query, per layer (see :class:`PreparedQueries`).

    Query gradients ``g_q = ∇ of`` (the measurement by default) are taken per parameter by the
    gradient engine in the compute dtype (``Runtime.dtype``, else the model's), solved block by
    block (:meth:`~influencekit.InverseCurvature.solve_per_parameter`), and turned into per-layer
    terms batch by batch; with ``rank`` only the rank-r factors are kept.
    ``include_regularizer``: record ``((C + λI)⁻¹ g_q)ᵀ ∇R`` for training gradients with ∇R.
    """
    dtype = compute_dtype(target, runtime)
    params = target.params(dtype, runtime.device)
    engine = GradientEngine(target, runtime.engine)
    reg = regularizer_gradient(target, params) if include_regularizer else None
    reg = None if reg is None else target.space.unflatten(reg)
    what = "query data" if of == "measurement" else "data"
    parts = []
    for start, batch, _ in iter_batches(as_loader(query, runtime, what), runtime, dtype,
                                        desc=desc):
        values, grads = engine(params, batch, of)
        check_finite_parts(values, grads, start, of if isinstance(of, str) else "value")
        terms, regularizer = solve_into_terms(inverse, grads, engine.layers, engine.rest, rank,
                                              runtime, reg)
        parts.append(PreparedQueries(terms, list(engine.layers), list(engine.rest),
                                     regularizer, rank, rest_engine_name(engine),
                                     frozenset(engine.expanded)))
    if not parts:
        raise InfluenceKitError("the query data holds no example")
    prepared = concat_queries(parts) if len(parts) > 1 else parts[0]
    del parts
    release_freed_memory()  # the raw query gradients and the solves' transients
    return prepared


def check_finite_parts(values: torch.Tensor, grads: dict[str, torch.Tensor], start: int,
                       what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first example whose value or gradient (given
    per parameter) is not finite."""
    bad = ~torch.isfinite(values)
    for g in grads.values():
        bad = bad | ~torch.isfinite(g.reshape(g.shape[0], -1).sum(dim=1))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        kind = "value" if not torch.isfinite(values[i]) else "gradient"
        raise NonFiniteError(
            f"the {what} {kind} of example {start + i} is not finite ({values[i].item()}). "
            "Check that example's inputs and label, the model's numerics (e.g. log of 0), or "
            "compute in float64 with Runtime(dtype=torch.float64).", index=start + i)


# -- the training side: one hooked pass per batch -------------------------------------------------
@dataclass
class BatchParts:
    """One training batch scored against prepared queries.

    ``terms``: per query term (in the order of ``PreparedQueries.terms``), ``[n_q, B]`` (or
    ``[n_q, B, T_layer]`` with tokens); ``mask``: ``[B, T]`` real tokens (None: no token mask);
    ``length``: the sequence length T of token-wise scores.
    """

    start: int
    size: int
    terms: list[torch.Tensor]
    mask: torch.Tensor | None
    length: int


def iter_train_parts(queries: PreparedQueries, target: Target, train, runtime: Runtime, *,
                     tokens: bool = False, desc: str = "scoring train"):
    """Yield :class:`BatchParts` per training batch, in data-set order.

    One hooked forward and one backward pass of the per-example training losses per batch;
    with ``tokens=True`` every hooked term is returned per token ``[n_q, B, T_layer]``.
    """
    dtype = compute_dtype(target, runtime)
    params = live_params(target, dtype, runtime.device)
    flat_engine = _rest_engine(target, queries)
    rest_params = None if flat_engine is None else flat_engine.target.params(dtype,
                                                                             runtime.device)
    terms = [_cast_term(t, score_dtype(dtype), runtime.device) for t in queries.terms]
    modules = {layer.name: target.model.get_submodule(layer.name) for layer in queries.hooked}
    loader = as_loader(train, runtime, "training data")
    for start, batch, _ in iter_batches(loader, runtime, dtype, desc=desc):
        # hooks live for one batch only: the rest engine's passes must not meet them
        with LayerPass(target, queries.hooked, queries.expanded) as lp:
            outputs = lp.forward(params, batch)
            values = target.loss_from_outputs(outputs, batch)
            _check_values(values, start)
            size = values.shape[0]
            inputs = dict(lp.inputs)
            for layer in queries.hooked:
                x = inputs[layer.name]
                if (x.shape[0] if x.dim() else 1) != size:
                    raise broadcast_input_error(layer.name, x.shape[0] if x.dim() else 1, size)
            out_grads = lp.backward(values) if queries.hooked else {}
        del outputs, values
        rest = None
        if flat_engine is not None:
            _, rest = flat_engine(rest_params, batch, "loss")
        mask = target.token_mask(batch) if tokens else None
        parts = [_score_term(t, modules, inputs, out_grads, rest, tokens, size) for t in terms]
        del inputs, out_grads, rest
        _check_scores(parts, start)
        length = _sequence_length(mask, parts, terms)
        yield BatchParts(start, size, parts, mask, length)


def _rest_engine(target: Target, queries: PreparedQueries) -> GradientEngine | None:
    if not queries.rest:
        return None
    return rest_engine(target, queries.rest, queries.rest_engine)


def rest_engine(target: Target, names: list[str], engine: str) -> GradientEngine:
    """A gradient engine for the parameters ``names`` alone (those no hook can handle)."""
    return GradientEngine(Target(target.model, target.task, params=list(names)), engine)


def rest_engine_name(engine: GradientEngine) -> str:
    """How the parameters an engine could not hook are differentiated later: the engine the
    user chose (``"vmap"`` / ``"loop"``), else ``"loop"`` once vmap failed, else ``"auto"``."""
    if engine.engine in ("vmap", "loop"):
        return engine.engine
    return "loop" if engine.rest_method == "loop" else "auto"


def _cast_term(term, dtype, device):
    fields = {}
    for f in dataclasses.fields(term):
        value = getattr(term, f.name)
        if isinstance(value, torch.Tensor):
            value = value.to(dtype=dtype, device=device)
        fields[f.name] = value
    return type(term)(**fields)


def _check_values(values: torch.Tensor, start: int) -> None:
    bad = ~torch.isfinite(values)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise NonFiniteError(
            f"the loss value of training example {start + i} is not finite "
            f"({values[i].item()}). Check that example's inputs and label, or compute in "
            "float64 with Runtime(dtype=torch.float64).", index=start + i)


def _check_scores(parts: list[torch.Tensor], start: int) -> None:
    """A non-finite training gradient shows as a non-finite score of its example."""
    for part in parts:
        per_example = part if part.dim() == 2 else part.sum(dim=2)
        bad = ~torch.isfinite(per_example.sum(dim=0))
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise NonFiniteError(
                f"the loss gradient of training example {start + i} is not finite (its score "
                "is not). Check that example's inputs and label, or compute in float64 with "
                "Runtime(dtype=torch.float64).", index=start + i)


def _sequence_length(mask, parts, terms) -> int:
    if mask is not None:
        return int(mask.shape[1])
    lengths = [p.shape[2] for p in parts if p.dim() == 3]
    return max(lengths) if lengths else 1


# -- scores assembled from the parts --------------------------------------------------------------
@dataclass(frozen=True)
class TokenScores:
    """Token-wise scores of training sequences.

    Attributes:
        tokens: ``[n_query, n_train, T]``: the part of each score that flows through training
            token t, ``Σ_layers δ_tᵀ Q a_t`` over the layers whose token dimension is the
            sequence (T = the longest padded length over the batches; zero beyond a batch's
            length, on padding (``Task.token_mask`` False) and past the end).
        rest: ``[n_query, n_train]``: everything not tied to one token — layers with another
            token dimension (a classifier head on a pooled vector), parameters scored from flat
            gradients, the regulariser's ∇R, and what masked tokens would carry (zero for a
            correctly masked model).

    ``tokens.sum(-1) + rest`` is the score of :meth:`Influence.pairwise` (same sign and scale).
    """

    tokens: torch.Tensor
    rest: torch.Tensor

    def total(self) -> torch.Tensor:
        """``[n_query, n_train]``: the sequence scores."""
        return self.tokens.sum(dim=-1) + self.rest


def iter_pairwise_factored(queries: PreparedQueries, target: Target, train,
                           runtime: Runtime):
    """Yield ``(start, scores [n_query, B])`` per training batch, in data-set order."""
    for part in iter_train_parts(queries, target, train, runtime):
        total = queries.regularizer_total(part.terms[0].dtype, part.terms[0].device)[:, None]
        yield part.start, total + sum(part.terms)


def pairwise_factored(queries: PreparedQueries, target: Target, train,
                      runtime: Runtime) -> torch.Tensor:
    """``[n_query, n_train]`` scores of prepared queries (module docstring)."""
    blocks = [b for _, b in iter_pairwise_factored(queries, target, train, runtime)]
    return torch.cat(blocks, dim=1)


def pairwise_sets(sets: list[PreparedQueries], target: Target, train,
                  runtime: Runtime) -> list[torch.Tensor]:
    """Scores ``[n_query_i, n_train]`` of several prepared query sets (e.g. one per query rank)
    from ONE pass over the training data. The sets must come from the same Target and engine."""
    first = sets[0]
    for other in sets[1:]:
        if [layer.name for layer in other.hooked] != [layer.name for layer in first.hooked] \
                or other.rest != first.rest:
            raise InfluenceKitError("query sets scored together must have the same hooked "
                                    "layers and flat parameters (prepare them with the same "
                                    "Target and Runtime).")
    joined = dataclasses.replace(first, terms=[t for q in sets for t in q.terms],
                                 regularizer={},
                                 expanded=frozenset().union(*(q.expanded for q in sets)))
    blocks: list[list[torch.Tensor]] = [[] for _ in sets]
    for part in iter_train_parts(joined, target, train, runtime):
        at = 0
        for i, q in enumerate(sets):
            terms = part.terms[at:at + len(q.terms)]
            at += len(q.terms)
            reg = q.regularizer_total(terms[0].dtype, terms[0].device)[:, None]
            blocks[i].append(reg + sum(terms))
    return [torch.cat(b, dim=1) for b in blocks]


def per_module_factored(queries: PreparedQueries, target: Target, train,
                        runtime: Runtime) -> dict[str, torch.Tensor]:
    """``{module: [n_query, n_train]}``, adding up to :func:`pairwise_factored`."""
    blocks: dict[str, list[torch.Tensor]] = {m: [] for m in queries.modules}
    for part in iter_train_parts(queries, target, train, runtime, desc="scoring per module"):
        sums: dict[str, torch.Tensor] = {}
        for term, scores in zip(queries.terms, part.terms, strict=True):
            sums[term.module] = scores if term.module not in sums else sums[term.module] + scores
        for module, value in queries.regularizer.items():
            sums[module] = sums[module] + value.to(sums[module])[:, None]
        for module in blocks:
            blocks[module].append(sums[module])
    return {m: torch.cat(b, dim=1) for m, b in blocks.items()}


def train_token_factored(queries: PreparedQueries, target: Target, train,
                         runtime: Runtime) -> TokenScores:
    """Token-wise scores of the training sequences (:class:`TokenScores`)."""
    token_blocks, rest_blocks = [], []
    for part in iter_train_parts(queries, target, train, runtime, tokens=True,
                                 desc="scoring train tokens"):
        first = part.terms[0]
        tokens = torch.zeros(queries.n_query, part.size, part.length, dtype=first.dtype,
                             device=first.device)
        rest = queries.regularizer_total(first.dtype, first.device)[:, None].expand(
            -1, part.size).clone()
        for scores in part.terms:
            if scores.dim() == 3 and scores.shape[2] == part.length:
                tokens += scores
            else:
                rest += scores if scores.dim() == 2 else scores.sum(dim=2)
        if part.mask is not None:
            keep = part.mask.to(device=tokens.device, dtype=tokens.dtype)[None]
            rest += (tokens * (1 - keep)).sum(dim=2)
            tokens = tokens * keep
        token_blocks.append(tokens)
        rest_blocks.append(rest)
    length = max(b.shape[2] for b in token_blocks)
    padded = [torch.nn.functional.pad(b, (0, length - b.shape[2])) for b in token_blocks]
    return TokenScores(torch.cat(padded, dim=1), torch.cat(rest_blocks, dim=1))


def prepare_token_queries(target: Target, inverse, query, runtime: Runtime, *,
                          rank: int | None = None, include_regularizer: bool = True
                          ) -> tuple[PreparedQueries, list[tuple[int, int]], int]:
    """Queries split by measured token: ``(prepared, rows, T)``.

    Row ``i`` of ``prepared`` is ``(C + λI)⁻¹ ∇f_{q,τ}`` with ``(q, τ) = rows[i]``, where
    ``f_{q,τ}`` is the measurement's term of token τ (``Task.token_measurements``, summing over
    τ to the query's measurement); T is the longest query length.
    """
    dtype = compute_dtype(target, runtime)
    params = target.params(dtype, runtime.device)
    task = target.task
    parts, rows, longest = [], [], 0
    loader = as_loader(query, runtime, "query data")
    for start, batch, _ in iter_batches(loader, runtime, dtype, desc="query token gradients"):
        with torch.no_grad():
            outputs = target.outputs(params, batch)
            values = task.token_measurements(outputs, target.targets(batch, outputs))
        size, length = values.shape
        longest = max(longest, length)
        for tau in range(length):
            def token_term(out, targets, tau=tau):
                return task.token_measurements(out, targets)[:, tau]
            parts.append(prepare_queries(target, inverse, batch_data(batch), runtime,
                                         of=token_term, rank=rank,
                                         include_regularizer=include_regularizer,
                                         desc=f"query token {tau}"))
            rows.extend((start + b, tau) for b in range(size))
    if not parts:
        raise InfluenceKitError("the query data holds no example")
    return concat_queries(parts), rows, longest


def batch_data(batch):
    """One batch as data (a tuple, dict or tensor of its tensors) for a single pass."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    return batch


# -- one term against one batch -------------------------------------------------------------------
def _score_term(term, modules, inputs, out_grads, rest, tokens: bool, size: int):
    """``[n_q, B]`` (or ``[n_q, B, T_layer]`` when ``tokens`` and the term has tokens)."""
    if isinstance(term, FlatQuery):
        g = torch.cat([rest[name].reshape(size, -1) for name in term.names], dim=1)
        return term.flat @ g.to(term.flat.dtype).T
    layer = term.layer
    module = modules[layer.name]
    x = inputs[layer.name]
    grad = out_grads.get(layer.name)
    if grad is None:  # the layer does not reach the loss: no contribution
        n = term.n_query
        length = _token_count(layer, module, x) if tokens else None
        shape = (n, size) if length is None else (n, size, length)
        return torch.zeros(shape, dtype=_dtype(term), device=x.device)
    delta = layer_output_grads(layer, grad).to(_dtype(term))
    if isinstance(term, DiagonalQuery):
        return _diagonal_scores(term, module, x, delta, tokens)
    if layer.kind == "embedding":
        return _embedding_scores(term, module, x, delta, tokens)
    a = layer_activations(layer, module, x).to(delta.dtype)
    if term.full is None:
        out = _low_rank_token_scores(a, delta, term.left, term.right)
        return out if tokens else out.sum(dim=2)
    if tokens or a.shape[1] * term.n_query <= a.shape[1] + term.n_query:
        out = _full_token_scores(a, delta, term.full)
        return out if tokens else out.sum(dim=2)
    return _full_example_scores(a, delta, term.full)


def _dtype(term) -> torch.dtype:
    for f in dataclasses.fields(term):
        value = getattr(term, f.name)
        if isinstance(value, torch.Tensor):
            return value.dtype
    raise AssertionError("a query term holds no tensor")


def _token_count(layer: Layer, module, x) -> int:
    if layer.kind in DIAGONAL_KINDS:
        return normalized_inputs(layer, module, x).shape[1]
    if layer.kind == "embedding":
        return x.reshape(x.shape[0], -1).shape[1]
    return layer_activations(layer, module, x).shape[1]


def _full_example_scores(a, delta, q) -> torch.Tensor:
    """``[n_q, B]`` = ⟨Q, Σ_t δ_t a_tᵀ⟩ through per-example gradient matrices, in chunks."""
    n, d_out, width = q.shape
    flat_q = q.reshape(n, d_out * width)
    step = max(1, CHUNK_ELEMENTS // max(1, d_out * width))
    out = []
    for lo in range(0, a.shape[0], step):
        g = torch.bmm(delta[lo:lo + step].transpose(1, 2), a[lo:lo + step])  # [b, d_out, width]
        out.append(flat_q @ g.reshape(g.shape[0], -1).T)
    return torch.cat(out, dim=1)


def _full_token_scores(a, delta, q) -> torch.Tensor:
    """``[n_q, B, T]`` = δ_tᵀ Q a_t, in chunks of queries."""
    n, d_out, width = q.shape
    size, length = a.shape[:2]
    step = max(1, CHUNK_ELEMENTS // max(1, size * length * d_out))
    out = []
    for lo in range(0, n, step):
        block = q[lo:lo + step]
        qa = a @ block.reshape(-1, width).T                                  # [B, T, n·d_out]
        qa = qa.reshape(size, length, block.shape[0], d_out)
        out.append(torch.einsum("btqo,bto->qbt", qa, delta))
    return torch.cat(out, dim=0)


def _low_rank_token_scores(a, delta, left, right) -> torch.Tensor:
    """``[n_q, B, T]`` = Σ_k (δ_t·u_k)(a_t·v_k) for every query at once."""
    n, d_out, r = left.shape
    du = delta @ left.permute(1, 0, 2).reshape(d_out, n * r)                 # [B, T, n·r]
    av = a @ right.permute(1, 0, 2).reshape(right.shape[1], n * r)
    prod = (du * av).reshape(*a.shape[:2], n, r).sum(dim=3)                  # [B, T, n]
    return prod.permute(2, 0, 1)


def _embedding_scores(term: KroneckerQuery, module, x, delta, tokens: bool) -> torch.Tensor:
    """``δ_t · Q[:, id_t]``: the one-hot input picks a column of Q (rows of the stored weight)."""
    ids = x.reshape(x.shape[0], -1)
    if module.padding_idx is not None:
        delta = delta.masked_fill((ids == module.padding_idx)[..., None], 0)
    size, length = ids.shape
    if term.full is None:
        n, d_out, r = term.left.shape
        du = delta @ term.left.permute(1, 0, 2).reshape(d_out, n * r)
        rows = term.right.permute(1, 0, 2).reshape(term.right.shape[1], n * r)   # [V, n·r]
        out = (du * rows[ids]).reshape(size, length, n, r).sum(dim=3).permute(2, 0, 1)
    else:
        n, d_out = term.full.shape[:2]
        step = max(1, CHUNK_ELEMENTS // max(1, size * length * d_out))
        parts = []
        for lo in range(0, n, step):
            block = term.full[lo:lo + step]                                  # [n', d_out, V]
            picked = block.permute(2, 0, 1)[ids]                             # [B, T, n', d_out]
            parts.append(torch.einsum("btqo,bto->qbt", picked, delta))
        out = torch.cat(parts, dim=0)
    return out if tokens else out.sum(dim=2)


def _diagonal_scores(term: DiagonalQuery, module, x, delta, tokens: bool) -> torch.Tensor:
    """``Σ_t δ_t · (Q_w ⊙ x̂_t + Q_b)`` of a LayerNorm / RMSNorm."""
    out = 0
    if term.weight is not None:
        xhat = normalized_inputs(term.layer, module, x).to(delta.dtype)
        out = out + torch.einsum("btd,qd->qbt", delta * xhat, term.weight)
    if term.bias is not None:
        out = out + torch.einsum("btd,qd->qbt", delta, term.bias)
    return out if tokens else out.sum(dim=2)


# -- self-influence, block by block ---------------------------------------------------------------
def self_influence_factored(target: Target, inverse, train, runtime: Runtime, *,
                            include_regularizer: bool = True,
                            desc: str = "self-influence") -> torch.Tensor:
    """``g_mᵀ (C + λI)⁻¹ g_m`` per training example ``[n_train]``, one inverse block at a time.

    Per batch: one hooked pass; per block of the inverse (``parameter_blocks_``), the per-example
    gradients of that block's parameters only (``[B, p_block]``) are formed, solved and
    dotted. Needs a block-diagonal inverse.
    """
    blocks = inverse.parameter_blocks_()
    if blocks is None:
        raise InfluenceKitError("self_influence_factored needs a block-diagonal inverse (KFAC, "
                                "EKFAC, Diagonal, block_diagonal); use Influence.self_influence.")
    dtype = compute_dtype(target, runtime)
    params = target.params(dtype, runtime.device)
    engine = GradientEngine(target, runtime.engine)
    shapes = dict(zip(target.space.names, target.space.shapes, strict=True))
    reg = regularizer_gradient(target, params) if include_regularizer else None
    reg = None if reg is None else target.space.unflatten(reg)
    out, rest_engines = [], {}
    loader = as_loader(train, runtime, "training data")
    for start, batch, _ in iter_batches(loader, runtime, dtype, desc=desc):
        passed = _hooked_pass(engine, params, batch, start, rest_engines)
        total = torch.zeros(passed.size, dtype=dtype, device=runtime.device)
        for block in blocks:
            grads = _block_gradients(block, passed, engine.layers, shapes, dtype)
            if reg is not None:
                grads = {n: g + reg[n].to(dtype) for n, g in grads.items()}
            check_finite_parts(torch.zeros_like(total), grads, start, "loss")
            solved = inverse.solve_per_parameter(grads, runtime)
            for name, g in grads.items():
                total = total + (solved[name].reshape(passed.size, -1)
                                 * g.reshape(passed.size, -1)).sum(dim=1)
        out.append(total)
    return torch.cat(out)


@dataclass
class _Passed:
    size: int
    inputs: dict
    out_grads: dict
    modules: dict
    rest: dict


def _hooked_pass(engine: GradientEngine, params, batch, start: int,
                 rest_engines: dict) -> _Passed:
    """Inputs and output gradients of the engine's layers (demoting, under ``engine="auto"``,
    a layer hooks cannot handle), and the flat per-example gradients of the rest."""
    target = engine.target
    live = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    while True:
        try:
            with LayerPass(target, engine.layers, engine.expanded) as lp:
                outputs = lp.forward(live, batch)
                values = target.loss_from_outputs(outputs, batch)
                _check_values(values.detach(), start)
                size = values.shape[0]
                inputs = dict(lp.inputs)
                for layer in engine.layers:
                    x = inputs[layer.name]
                    if (x.shape[0] if x.dim() else 1) != size:
                        raise broadcast_input_error(layer.name, x.shape[0] if x.dim() else 1,
                                                    size)
                out_grads = lp.backward(values) if engine.layers else {}
                modules = dict(lp.modules)
            break
        except HookIncompatibleError as exc:
            if exc.shared_input and engine.expand_shared(params, batch, exc.module):
                continue
            if engine.engine != "auto":
                raise
            engine.demote(exc.module)
    rest = {}
    if engine.rest:
        key = tuple(engine.rest)
        if key not in rest_engines:
            rest_engines[key] = rest_engine(target, engine.rest, rest_engine_name(engine))
        sub = rest_engines[key]
        _, rest = sub(sub.target.params(values.dtype, values.device), batch)
    return _Passed(size, inputs, out_grads, modules, rest)


def _block_gradients(block, passed: _Passed, layers: list[Layer], shapes, dtype
                     ) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}`` per-example gradients of one block's parameters (tied
    parameters summed over their layers), each layer's formed once."""
    wanted = set(block)
    grads: dict[str, torch.Tensor] = {n: passed.rest[n].to(dtype) for n in block
                                      if n in passed.rest}
    for layer in layers:
        if not wanted & {layer.weight, layer.bias}:
            continue
        part = per_example_layer_grads(layer, passed.modules[layer.name],
                                       passed.inputs[layer.name], passed.out_grads[layer.name],
                                       shapes, dtype)
        for name, g in part.items():
            if name in wanted:
                grads[name] = g if name not in grads else grads[name] + g
    return grads
