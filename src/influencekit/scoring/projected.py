"""Influence in a projected gradient space: per-layer projections, a gradient store, and an
exact or EK-FAC inverse fitted in the projected space (LoGra, Choe et al. 2024).

Each layer's gradient is projected by its own pair of matrices (:class:`~influencekit.grads.
LayerProjection`: ``G̃ = P_outᵀ G P_in``), so the projected gradient ``g̃ = Pᵀ g`` of the whole
Target is the concatenation of the layers' ``[k_out, k_in]`` blocks (LayerNorm / RMSNorm
gradients as they are), with ``P`` block diagonal and never formed. In that space:

- the curvature is ``C̃ = Pᵀ C P`` (the same kind, labels and weights as the unprojected one:
  ``(1/Σw) Σ_i w_i E_y[g̃_i(y) g̃_i(y)ᵀ]``, plus ``Pᵀ ∇²R P`` for an L2 regulariser),
  :class:`ProjectedCurvature`; ``ik.Exact(λ).fit(ProjectedCurvature(...))`` inverts it exactly
  (cross-layer terms included) and :class:`ProjectedEKFAC` approximates it per layer with
  EK-FAC on the projected activations and output gradients;
- the score is ``s̃ = g̃_qᵀ (C̃ + λI)⁻¹ g̃_m`` (same sign and scale as the conventions table's s,
  ``[n_query, n_train]``). With identity projections it IS s; with Gaussian or Rademacher ones
  ``P Pᵀ → I`` as the dimensions grow and ``P (PᵀCP + λI)⁻¹ Pᵀ = PPᵀ (C PPᵀ + λI)⁻¹ → (C + λI)⁻¹``.

The projected training gradients are computed once into a :class:`~influencekit.storage.
GradientStore` (:func:`build_gradient_store`, resumable, checksummed, refusing another
configuration) and scored against any number of new queries by :class:`ProjectedInfluence`
without touching the training data again.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import closing
from dataclasses import dataclass

import torch

from ..curvature.labels import LabelSets, resolve_label_mode
from ..errors import (
    InfluenceKitError,
    ModelMismatchError,
    NonFiniteError,
    UnsupportedModuleError,
)
from ..func.params import ParamSpace
from ..grads import (
    DIAGONAL_KINDS,
    KRONECKER_KINDS,
    GradientEngine,
    Layer,
    LayerPass,
    LayerProjection,
    as_dataset,
    as_loader,
    broadcast_input_error,
    check_weights,
    compute_dtype,
    find_layers,
    first_tied_parameter,
    iter_batches,
    layer_activations,
    layer_matrix,
    layer_output_grads,
    live_params,
    normalized_inputs,
    num_examples,
    regularizer_gradient,
    take,
)
from ..inverse.base import InverseCurvature
from ..runtime import Runtime, resolve_runtime
from ..storage import GradientStore, data_fingerprint
from ..task.regularizer import L2Regularizer
from ..task.target import Target

F64 = torch.float64


# -- the projected space --------------------------------------------------------------------------
def projected_layers(target: Target) -> list[Layer]:
    """The Target's layers (every selected parameter must lie in one hooked layer; no tied
    parameter)."""
    layers = find_layers(target, None, KRONECKER_KINDS + DIAGONAL_KINDS)
    tied = first_tied_parameter(layers)
    if tied is not None:
        name, first, second = tied
        raise UnsupportedModuleError(
            f"parameter {name!r} is shared by modules {first!r} and {second!r} (tied weights); "
            "projected gradients are per layer. Leave it out of the Target (params=[...]) for "
            "projected scoring.")
    return layers


def segment_shape(layer: Layer, projection: LayerProjection) -> tuple[int, int]:
    """A layer's block of the projected gradient: ``(k_out, k_in)`` for a Kronecker layer,
    ``(parts, d)`` (weight and/or bias rows) for a LayerNorm / RMSNorm."""
    if layer.kind in DIAGONAL_KINDS:
        return (int(bool(layer.weight)) + int(bool(layer.bias)), layer.d_out)
    return projection.dims(layer)


def projected_space(target: Target, projection: LayerProjection) -> ParamSpace:
    """Names (layer names) and shapes of the projected gradient's blocks, in order."""
    layers = projected_layers(target)
    return ParamSpace(tuple(layer.name for layer in layers),
                      tuple(segment_shape(layer, projection) for layer in layers))


def layout_config(target: Target, projection: LayerProjection) -> list:
    """``[[layer, kind, [shape]], ...]``: what each part of a stored row is."""
    return [[layer.name, layer.kind, list(segment_shape(layer, projection))]
            for layer in projected_layers(target)]


class ProjectedTarget:
    """What an inverse fitted in the projected space sees as its Target: the projected space
    and a fingerprint of (model, projection)."""

    def __init__(self, target: Target, projection: LayerProjection):
        self.target = target
        self.projection = projection
        self.space = projected_space(target, projection)

    @property
    def num_params(self) -> int:
        return self.space.numel

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.target.fingerprint().encode())
        h.update(json.dumps(self.projection.get_config(), sort_keys=True).encode())
        return h.hexdigest()


# -- projected gradients from one hooked pass -----------------------------------------------------
def _pass_inputs(target, lp, layers, batch, params):
    outputs = lp.forward(params, batch)
    inputs = dict(lp.inputs)
    size = outputs.shape[0]
    for layer in layers:
        x = inputs[layer.name]
        got = x.shape[0] if x.dim() else 1
        if got != size:
            raise broadcast_input_error(layer.name, got, size)
    return outputs, inputs


def _a_side(layer, module, x, projection, dtype):
    """Projected activations ``[B, T, k_in]`` of a Kronecker layer (rows of ``P_in`` at the
    ids for an embedding), or the normalised inputs ``x̂ [B, T, d]`` of a norm."""
    if layer.kind in DIAGONAL_KINDS:
        return normalized_inputs(layer, module, x).to(dtype)
    p_in = projection.matrices(layer, dtype, x.device)[1]
    if layer.kind == "embedding":
        ids = x.reshape(x.shape[0], -1)
        if p_in is None:
            return torch.nn.functional.one_hot(ids, layer.width).to(dtype)
        return p_in[ids]
    a = layer_activations(layer, module, x).to(dtype)
    return a if p_in is None else a @ p_in


def _delta_side(layer, module, x, grad, projection, dtype, like):
    """Projected output gradients ``[B, T, k_out]`` (a norm's: ``δ [B, T, d]``); zeros when the
    layer does not reach the differentiated value."""
    if grad is None:
        k = layer.d_out if layer.kind in DIAGONAL_KINDS else projection.dims(layer)[0]
        return torch.zeros(*like.shape[:2], k, dtype=dtype, device=like.device)
    delta = layer_output_grads(layer, grad).to(dtype)
    if layer.kind in DIAGONAL_KINDS:
        return delta
    if layer.kind == "embedding" and module.padding_idx is not None:
        ids = x.reshape(x.shape[0], -1)
        delta = delta.masked_fill((ids == module.padding_idx)[..., None], 0)
    p_out = projection.matrices(layer, dtype, delta.device)[0]
    return delta if p_out is None else delta @ p_out


def _mask(mask, tokens):
    if mask is None or tokens.shape[1] != mask.shape[1]:
        return None
    return mask.to(device=tokens.device, dtype=tokens.dtype)[..., None]


def _example_block(layer, a, d) -> torch.Tensor:
    """``[B, *segment]`` per-example projected gradient of one layer from its streams."""
    if layer.kind in DIAGONAL_KINDS:
        parts = []
        if layer.weight:
            parts.append((d * a).sum(dim=1))
        if layer.bias:
            parts.append(d.sum(dim=1))
        return torch.stack(parts, dim=1)
    return torch.bmm(d.transpose(1, 2), a)


def iter_projected_gradients(target: Target, data, projection: LayerProjection,
                             runtime: Runtime | None = None, *, of="loss",
                             include_regularizer: bool | None = None,
                             desc: str = "projected gradients"):
    """Yield ``(start, g̃ [B, k])``: per-example projected gradients of ``of`` (the training loss,
    the task's measurement, or a function), in data-set order, in the compute dtype.

    ``include_regularizer`` (default: for ``of="loss"``) adds the projected ∇R to every row.
    One hooked forward and backward pass per batch; nothing of size ``[B, p]``.
    """
    runtime = resolve_runtime(runtime)
    projection.check()
    dtype = compute_dtype(target, runtime)
    layers = projected_layers(target)
    params = live_params(target, dtype, runtime.device)
    if include_regularizer is None:
        include_regularizer = of == "loss"
    reg_row = (_projected_regularizer(target, layers, projection, dtype, runtime.device)
               if include_regularizer else None)
    values_of = GradientEngine(target, "hooks").values
    loader = as_loader(data, runtime, "training data" if of == "loss" else "query data")
    for start, batch, _ in iter_batches(loader, runtime, dtype, desc=desc):
        with LayerPass(target, layers) as lp:
            outputs, inputs = _pass_inputs(target, lp, layers, batch, params)
            values = values_of(outputs, batch, of)
            _check_finite(values, start)
            out_grads = lp.backward(values)
            modules = lp.modules
        rows = []
        for layer in layers:
            module, x = modules[layer.name], inputs[layer.name]
            a = _a_side(layer, module, x, projection, dtype)
            d = _delta_side(layer, module, x, out_grads[layer.name], projection, dtype, a)
            rows.append(_example_block(layer, a, d).reshape(values.shape[0], -1))
        row = torch.cat(rows, dim=1)
        if reg_row is not None:
            row = row + reg_row
        _check_finite(row.sum(dim=1), start)
        yield start, row


def _check_finite(values: torch.Tensor, start: int) -> None:
    bad = ~torch.isfinite(values)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise NonFiniteError(f"the value or gradient of example {start + i} is not finite; "
                             "check its inputs and label, or compute in float64 with "
                             "Runtime(dtype=torch.float64).", index=start + i)


def _projected_regularizer(target, layers, projection, dtype, device) -> torch.Tensor | None:
    """``Pᵀ ∇R`` as one row ``[k]`` (None without a regulariser)."""
    params = target.params(dtype, device)
    flat = regularizer_gradient(target, params)
    if flat is None:
        return None
    grads = {n: g[None] for n, g in target.space.unflatten(flat).items()}
    parts = []
    for layer in layers:
        if layer.kind in DIAGONAL_KINDS:
            parts.append(torch.cat([grads[n].reshape(-1) for n in (layer.weight, layer.bias)
                                    if n]))
        else:
            parts.append(projection.project_matrix(layer, layer_matrix(layer, grads)).reshape(-1))
    return torch.cat(parts)


# -- the gradient store ---------------------------------------------------------------------------
def store_config(target: Target, projection: LayerProjection, include_regularizer: bool,
                 dtype: torch.dtype, data_id: str | None) -> dict:
    """What a gradient store records (any difference refuses to reuse the store)."""
    reg = target.regularizer
    return {
        "projection": projection.get_config(),
        "layout": layout_config(target, projection),
        "params": list(target.space.names),
        "task": f"{type(target.task).__module__}.{type(target.task).__qualname__}",
        "regularizer": (None if reg is None else
                        {"class": type(reg).__name__,
                         "strength": getattr(reg, "strength", None)}),
        "include_regularizer": bool(include_regularizer),
        "gradient_dtype": str(dtype).replace("torch.", ""),
        "model_fingerprint": target.fingerprint(),
        "data_fingerprint": data_id,
    }


def build_gradient_store(folder, target: Target, train, projection: LayerProjection,
                         runtime: Runtime | None = None, *, include_regularizer: bool = True,
                         dtype: str = "float32", fingerprint: str | None = None
                         ) -> GradientStore:
    """Write the projected training gradients ``g̃_m = Pᵀ(∇ℓ_m + ∇R)`` to a store (or finish one).

    Args:
        folder: the store's folder (created, or reopened to resume: only rows not yet done are
            computed, so a killed run continues where it stopped).
        target, train, projection: what is stored (recorded in the store with the model and
            data fingerprints; another configuration in ``folder`` is refused, naming the
            differing keys).
        include_regularizer: add ``Pᵀ∇R`` to every row (the conventions table's g_m).
        dtype: ``"float32"`` (default), ``"float64"`` or ``"float16"`` on disk.
        fingerprint: the training data's fingerprint (default :func:`data_fingerprint`).

    Rows are written batch by batch (``Runtime.batch_size``), each batch synced before it is
    marked done. Returns the :class:`~influencekit.storage.GradientStore`.
    """
    runtime = resolve_runtime(runtime)
    n_train = num_examples(as_loader(train, runtime, "training data"))
    width = projected_space(target, projection).numel
    config = store_config(target, projection, include_regularizer,
                          compute_dtype(target, runtime),
                          fingerprint if fingerprint is not None
                          else data_fingerprint(as_dataset(train, "training data")))
    store = GradientStore.open(folder, n_train, width, config, dtype)
    pending = store.pending()
    for first, last in _runs(pending):
        data = take(train, range(first, last + 1), runtime, "training data")
        for start, rows in iter_projected_gradients(target, data, projection, runtime,
                                                    include_regularizer=include_regularizer,
                                                    desc="gradient store"):
            store.write_rows(first + start, rows)
    return store


def _runs(rows: list[int]):
    if not rows:
        return
    first = prev = rows[0]
    for r in rows[1:]:
        if r != prev + 1:
            yield first, prev
            first = r
        prev = r
    yield first, prev


# -- the projected curvature ----------------------------------------------------------------------
class ProjectedCurvature:
    """``C̃ = Pᵀ C P``: a :class:`~influencekit.Curvature` seen through a projection.

    Args:
        curvature: the unprojected curvature (its target, data, kind, weights, n_samples and
            seed are used as they are). ``kind`` must be ``"ggn"``, ``"fisher"`` or
            ``"empirical_fisher"`` (a Gauss-Newton / Fisher: ``E_y[g̃ g̃ᵀ]`` with the model's
            labels, exact where the task enumerates them, else ``n_samples`` seeded draws;
            the data's labels for the empirical Fisher).
        projection: the :class:`~influencekit.grads.LayerProjection`.
        labels: ``"auto"``, ``"exact"`` or ``"sampled"`` as for :class:`~influencekit.KFAC`.

    An inverse fitted on it (``ik.Exact(λ)``, :class:`ProjectedEKFAC`) works in the projected
    space; score with :class:`ProjectedInfluence`. Fitting skips the stationarity check (the
    projected space has no parameters of its own): run
    ``ik.diagnostics.stationarity(target, train)`` on the unprojected Target instead.
    """

    measures_stationarity = False

    def __init__(self, curvature, projection: LayerProjection, labels: str = "auto"):
        self.curvature = curvature
        self.projection = projection
        self.labels = labels

    @property
    def target(self) -> ProjectedTarget:
        return ProjectedTarget(self.curvature.target, self.projection)

    @property
    def kind(self) -> str:
        return self.curvature.kind

    def total_weight(self, runtime: Runtime | None = None) -> float:
        return self.curvature.total_weight(resolve_runtime(runtime))

    def label_sets(self, n_samples: int | None = None, seed: int | None = None) -> LabelSets:
        """A fresh label generator (the same draws on every pass)."""
        if self.kind == "hessian":
            raise InfluenceKitError(
                "a projected curvature is a Gauss-Newton / Fisher E_y[g̃ g̃ᵀ], not kind='hessian';"
                " use kind='ggn', 'fisher' or 'empirical_fisher'.")
        task = self.curvature.target.task
        mode = resolve_label_mode(task, self.kind, self.labels)
        n = n_samples or self.curvature.n_samples or 1
        return LabelSets(mode, n, self.curvature.seed if seed is None else seed)

    def dense(self, runtime: Runtime | None = None) -> torch.Tensor:
        """``[k, k]`` float64: ``(1/Σw) Σ_i w_i E_y[g̃_i g̃_iᵀ] + Pᵀ ∇²R P`` (cross-layer terms
        included). Memory k²: keep the projected dimensions small."""
        runtime = resolve_runtime(runtime)
        layers = projected_layers(self.curvature.target)
        k = projected_space(self.curvature.target, self.projection).numel
        total = torch.zeros(k, k, dtype=F64, device=runtime.device)
        weight = 0.0
        with closing(self.iter_batches(runtime, self.label_sets())) as stream:
            for w, streams in stream:
                weight += float(w.sum())
                for coef, deltas in streams.label_sets:
                    rows = torch.cat([_example_block(layer, streams.acts[layer.name],
                                                     deltas[layer.name]).reshape(w.shape[0], -1)
                                      for layer in layers], dim=1)
                    total += (rows * coef[:, None]).T @ rows
        total /= weight
        return 0.5 * (total + total.T) + self.regularizer_block(runtime.device)

    def regularizer_block(self, device="cpu") -> torch.Tensor:
        """``Pᵀ ∇²R P`` ``[k, k]`` (block diagonal): ``strength · (P_outᵀP_out ⊗ P_inᵀP_in)``
        per Kronecker layer, ``strength · I`` per LayerNorm / RMSNorm."""
        target = self.curvature.target
        layers = projected_layers(target)
        blocks = []
        for layer, strength in zip(layers, regularizer_strengths(target, layers), strict=True):
            size = int(torch.Size(segment_shape(layer, self.projection)).numel())
            if strength == 0.0:
                blocks.append(torch.zeros(size, size, dtype=F64, device=device))
            elif layer.kind in DIAGONAL_KINDS:
                blocks.append(strength * torch.eye(size, dtype=F64, device=device))
            else:
                gram_out, gram_in = projection_grams(self.projection, layer, device)
                blocks.append(strength * torch.kron(gram_out, gram_in))
        return torch.block_diag(*blocks)

    def iter_batches(self, runtime: Runtime, labels: LabelSets):
        """Yield ``(w [B], streams)`` per batch (float64): ``streams.acts[layer]`` the projected
        activations ``[B, T, k_in]`` (x̂ for norms), masked; ``streams.counts[layer]`` real
        tokens ``[B]``; ``streams.label_sets`` an iterator of ``(coef [B], {layer: projected
        output gradients [B, T, k_out]})`` (consume before advancing)."""
        target = self.curvature.target
        layers = projected_layers(target)
        loader = self.curvature.loader(runtime)
        weights = check_weights(self.curvature.weights, num_examples(loader), runtime)
        dtype = compute_dtype(target, runtime)
        params = live_params(target, dtype, runtime.device)
        for start, batch, w in iter_batches(loader, runtime, dtype, weights,
                                            desc="projected curvature"):
            with LayerPass(target, layers) as lp:
                outputs, inputs = _pass_inputs(target, lp, layers, batch, params)
                mask = target.token_mask(batch)
                acts, counts, masks = {}, {}, {}
                for layer in layers:
                    a = _a_side(layer, lp.modules[layer.name], inputs[layer.name],
                                self.projection, F64)
                    masks[layer.name] = _mask(mask, a)
                    acts[layer.name] = a if masks[layer.name] is None else a * masks[layer.name]
                    counts[layer.name] = _counts(masks[layer.name], a)
                sets = labels(target.task, outputs, target.targets(batch, outputs))
                label_grads = []
                for targets, probs in sets:
                    losses = target.loss_from_outputs(outputs, batch, targets)
                    _check_finite(losses.detach(), start)
                    out_grads = lp.backward(losses, retain_graph=True)
                    deltas = {}
                    for layer in layers:
                        d = _delta_side(layer, lp.modules[layer.name], inputs[layer.name],
                                        out_grads[layer.name], self.projection, F64,
                                        acts[layer.name])
                        m = masks[layer.name]
                        deltas[layer.name] = d if m is None else d * m
                    label_grads.append((w.to(F64) * probs.to(F64).to(w.device), deltas))
            yield w.to(F64), _Streams(acts, counts, iter(label_grads))


@dataclass
class _Streams:
    acts: dict
    counts: dict
    label_sets: object


def _counts(mask, a) -> torch.Tensor:
    if mask is None:
        return torch.full((a.shape[0],), float(a.shape[1]), dtype=F64, device=a.device)
    return mask[..., 0].sum(dim=1).clamp_min(1.0)


def projection_grams(projection: LayerProjection, layer: Layer, device="cpu"):
    """``(P_outᵀ P_out [k_out, k_out], P_inᵀ P_in [k_in, k_in])`` float64 (I for identity)."""
    p_out, p_in = projection.matrices(layer, F64, device)
    k_out, k_in = projection.dims(layer)
    gram_out = torch.eye(k_out, dtype=F64, device=device) if p_out is None else p_out.T @ p_out
    gram_in = torch.eye(k_in, dtype=F64, device=device) if p_in is None else p_in.T @ p_in
    return gram_out, gram_in


def regularizer_strengths(target: Target, layers: list[Layer]) -> list[float]:
    """An L2 regulariser's strength on each layer (0 where it does not apply)."""
    reg = target.regularizer
    if reg is None:
        return [0.0] * len(layers)
    if not isinstance(reg, L2Regularizer):
        raise InfluenceKitError(
            f"a projected curvature adds the Hessian of an L2Regularizer only, not "
            f"{type(reg).__name__}. Use ik.L2Regularizer or no regulariser.")
    out = []
    for layer in layers:
        names = [n for n in (layer.weight, layer.bias) if n]
        inside = {reg.names is None or n in reg.names for n in names}
        if len(inside) > 1:
            raise InfluenceKitError(f"the L2Regularizer covers only some parameters of layer "
                                    f"{layer.name!r}; regularise all of them or none.")
        out.append(reg.strength if inside.pop() else 0.0)
    return out


# -- EK-FAC in the projected space ----------------------------------------------------------------
class ProjectedEKFAC(InverseCurvature):
    """EK-FAC fitted in a projected space (:class:`ProjectedCurvature`).

    Per Kronecker layer: factors of the projected activations ``Ã = (1/Σw) Σ_i w_i (1/T_i)
    Σ_t ã ãᵀ`` and output gradients ``S̃ = (1/Σw) Σ_i w_i E_y[Σ_t δ̃ δ̃ᵀ]`` (masked tokens left
    out, as in :class:`~influencekit.EKFAC`), their eigenbases, and the eigenvalues replaced by
    the mean squared projected per-example gradient in that basis. An L2 regulariser adds the
    diagonal of ``strength · (P_outᵀP_out ⊗ P_inᵀP_in)`` in the eigenbasis (exactly ``strength``
    for identity projections). LayerNorm / RMSNorm layers get their exact block. With identity
    projections this is :class:`~influencekit.EKFAC` (which also gives norms an exact block).

    Args:
        damping: λ ≥ 0, or ``"auto"`` = 0.1 × each layer's mean eigenvalue.
        labels, n_samples, seed: as for :class:`~influencekit.EKFAC` (``n_samples`` / ``seed``
            override the curvature's when given).

    Fitted (lists over ``fit_info_["layers"]``): ``a_eigenvectors_``, ``s_eigenvectors_``,
    ``eigenvalues_`` (``[k_out, k_in]`` corrected, or ``[m]`` for a norm's exact block whose
    eigenvectors are in ``s_eigenvectors_``), ``layer_damping_``, ``regularizer_shift_``
    (``[k_out, k_in]`` or ``[m]`` per layer).
    """

    def __init__(self, damping: float | str = "auto", labels: str = "auto",
                 n_samples: int | None = None, seed: int | None = None):
        self.damping = damping
        self.labels = labels
        self.n_samples = n_samples
        self.seed = seed

    def _fit(self, curvature, runtime):
        if not isinstance(curvature, ProjectedCurvature):
            raise InfluenceKitError("ProjectedEKFAC fits a ProjectedCurvature(curvature, "
                                    "projection); for the unprojected model use ik.EKFAC.")
        if self.damping != "auto" and (isinstance(self.damping, str) or self.damping < 0):
            raise ValueError(f"damping must be a number >= 0 or 'auto', got {self.damping!r}")
        target, projection = curvature.curvature.target, curvature.projection
        layers = projected_layers(target)
        labels = curvature.label_sets(self.n_samples, self.seed)
        factors = _projected_factors(curvature, runtime, layers, labels)
        self.a_eigenvectors_, self.s_eigenvectors_, self.eigenvalues_ = [], [], []
        self.regularizer_shift_ = []
        norm_values = {}
        strengths = regularizer_strengths(target, layers)
        for layer, strength in zip(layers, strengths, strict=True):
            a, s = factors[layer.name]
            if layer.kind in DIAGONAL_KINDS:
                values, vectors = torch.linalg.eigh(s)       # the norm's exact block
                norm_values[layer.name] = values
                self.a_eigenvectors_.append(torch.zeros(0, dtype=F64))
                self.s_eigenvectors_.append(vectors.contiguous())
                self.regularizer_shift_.append(torch.full_like(values, strength))
                continue
            qa = torch.linalg.eigh(a)[1].contiguous()
            qs = torch.linalg.eigh(s)[1].contiguous()
            self.a_eigenvectors_.append(qa)
            self.s_eigenvectors_.append(qs)
            gram_out, gram_in = projection_grams(projection, layer, runtime.device)
            shift = torch.outer(torch.diagonal(qs.T @ gram_out @ qs),
                                torch.diagonal(qa.T @ gram_in @ qa))
            self.regularizer_shift_.append(strength * shift)
        corrections = _projected_corrections(curvature, runtime, layers,
                                             curvature.label_sets(self.n_samples, self.seed),
                                             self)
        for layer in layers:
            if layer.kind in DIAGONAL_KINDS:
                self.eigenvalues_.append(norm_values[layer.name])
            else:
                self.eigenvalues_.append(corrections[layer.name])
        means = [float(e.mean()) for e in self.eigenvalues_]
        dampings = [0.1 * m if self.damping == "auto" else float(self.damping) for m in means]
        self.layer_damping_ = torch.tensor(dampings, dtype=F64)
        self.fit_info_.update(layers=[layer.to_dict() for layer in layers],
                              projection=projection.get_config(),
                              damping={layer.name: d for layer, d in
                                       zip(layers, dampings, strict=True)})
        for i, layer in enumerate(layers):
            shifted = self.eigenvalues_[i] + self.regularizer_shift_[i] + dampings[i]
            if float(shifted.min()) <= 0:
                raise InfluenceKitError(
                    f"layer {layer.name!r}: the projected curvature plus damping is singular "
                    f"(damping {dampings[i]:.3g}); use damping > 0 or 'auto'.")

    @property
    def damping_(self) -> float:
        self.check_fitted()
        return float(self.layer_damping_.mean())

    def damping_vector_(self) -> torch.Tensor:
        space = self.param_space_
        return torch.cat([torch.full((size,), float(d), dtype=F64)
                          for size, d in zip(space.sizes, self.layer_damping_, strict=True)])

    def _solve(self, grads, runtime=None):
        space = self.param_space_
        out = torch.empty(grads.shape, dtype=F64, device=grads.device)
        for i, (sl, shape) in enumerate(zip(space.slices().values(), space.shapes,
                                            strict=True)):
            g = grads[:, sl].to(F64)
            qs = self.s_eigenvectors_[i].to(g.device)
            shift = self.regularizer_shift_[i].to(g.device) + float(self.layer_damping_[i])
            values = self.eigenvalues_[i].to(g.device) + shift
            if self.a_eigenvectors_[i].numel() == 0:            # a norm's exact block
                out[:, sl] = ((g @ qs) / values) @ qs.T
                continue
            qa = self.a_eigenvectors_[i].to(g.device)
            block = g.reshape(-1, *shape)
            rotated = qs.T @ block @ qa
            out[:, sl] = (qs @ (rotated / values) @ qa.T).reshape(g.shape[0], -1)
        return out

    _PER_LAYER = ("a_eigenvectors_", "s_eigenvectors_", "eigenvalues_", "regularizer_shift_")

    def _state_names(self):
        n = len(self.fit_info_["layers"])
        return [f"{attr}{i}" for attr in self._PER_LAYER for i in range(n)] + ["layer_damping_"]

    def state_dict(self):
        self.check_fitted()
        out = {f"{attr}{i}": t for attr in self._PER_LAYER
               for i, t in enumerate(getattr(self, attr))}
        out["layer_damping_"] = self.layer_damping_
        return out

    def load_state_dict(self, tensors, fit_info):
        n = len(fit_info["layers"])
        missing = [f"{a}{i}" for a in self._PER_LAYER for i in range(n)
                   if f"{a}{i}" not in tensors]
        if missing or "layer_damping_" not in tensors:
            raise ValueError(f"state for ProjectedEKFAC lacks tensors {missing}")
        for attr in self._PER_LAYER:
            setattr(self, attr, [tensors[f"{attr}{i}"] for i in range(n)])
        self.layer_damping_ = tensors["layer_damping_"]
        self.fit_info_ = dict(fit_info)
        return self


def _projected_factors(curvature: ProjectedCurvature, runtime, layers, labels):
    """``{layer: (Ã, S̃)}`` (a norm: ``(None, exact block)``), float64, of the MEAN loss."""
    a_sum, s_sum = {}, {}
    for layer in layers:
        if layer.kind in DIAGONAL_KINDS:
            m = int(torch.Size(segment_shape(layer, curvature.projection)).numel())
            a_sum[layer.name] = None
            s_sum[layer.name] = torch.zeros(m, m, dtype=F64, device=runtime.device)
        else:
            k_out, k_in = curvature.projection.dims(layer)
            a_sum[layer.name] = torch.zeros(k_in, k_in, dtype=F64, device=runtime.device)
            s_sum[layer.name] = torch.zeros(k_out, k_out, dtype=F64, device=runtime.device)
    total = 0.0
    with closing(curvature.iter_batches(runtime, labels)) as stream:
        for w, streams in stream:
            total += float(w.sum())
            for layer in layers:
                if layer.kind in DIAGONAL_KINDS:
                    continue
                a = streams.acts[layer.name]
                scale = (w / streams.counts[layer.name])[:, None, None]
                a_sum[layer.name] += torch.einsum("bti,btj->ij", a * scale, a)
            for coef, deltas in streams.label_sets:
                for layer in layers:
                    d = deltas[layer.name]
                    if layer.kind in DIAGONAL_KINDS:
                        g = _example_block(layer, streams.acts[layer.name], d)
                        g = g.reshape(g.shape[0], -1)
                        s_sum[layer.name] += (g * coef[:, None]).T @ g
                    else:
                        s_sum[layer.name] += torch.einsum("bto,btp->op",
                                                          d * coef[:, None, None], d)
    out = {}
    for layer in layers:
        a = a_sum[layer.name]
        s = s_sum[layer.name] / total
        out[layer.name] = (None if a is None else _sym(a / total), _sym(s))
    return out


def _projected_corrections(curvature, runtime, layers, labels, fitted: ProjectedEKFAC):
    """``{layer: Λ̃ [k_out, k_in]}``: mean squared projected gradients in the eigenbasis."""
    sums = {}
    total = 0.0
    index = {layer.name: i for i, layer in enumerate(layers)}
    with closing(curvature.iter_batches(runtime, labels)) as stream:
        for w, streams in stream:
            total += float(w.sum())
            for coef, deltas in streams.label_sets:
                for layer in layers:
                    if layer.kind in DIAGONAL_KINDS:
                        continue
                    i = index[layer.name]
                    qa, qs = fitted.a_eigenvectors_[i], fitted.s_eigenvectors_[i]
                    g = _example_block(layer, streams.acts[layer.name], deltas[layer.name])
                    rotated = qs.T @ g @ qa
                    part = torch.einsum("b,boj->oj", coef, rotated ** 2)
                    sums[layer.name] = part if layer.name not in sums else sums[layer.name] + part
    return {name: s / total for name, s in sums.items()}


def _sym(m: torch.Tensor) -> torch.Tensor:
    return 0.5 * (m + m.T)


# -- scoring --------------------------------------------------------------------------------------
class ProjectedInfluence:
    """Scores in the projected space: ``s̃ = g̃_qᵀ (C̃ + λI)⁻¹ g̃_m`` ``[n_query, n_train]`` (module
    docstring; same sign and scale as :meth:`~influencekit.Influence.pairwise`).

    Args:
        target: the Target (model, task, parameters).
        projection: the :class:`~influencekit.grads.LayerProjection` of the store and inverse.
        inverse: an inverse fitted on ``ProjectedCurvature(curvature, projection)``
            (``ik.Exact``, :class:`ProjectedEKFAC`).
        include_regularizer: training gradients with ``Pᵀ∇R`` (must match the store).
        allow_other_model: score even when the model differs from the inverse's / store's.
    """

    def __init__(self, target: Target, projection: LayerProjection, inverse: InverseCurvature,
                 include_regularizer: bool = True, allow_other_model: bool = False):
        self.target = target
        self.projection = projection
        self.inverse = inverse
        self.include_regularizer = include_regularizer
        self.allow_other_model = allow_other_model

    def _check(self):
        self.inverse.check_fitted()
        projected = ProjectedTarget(self.target, self.projection)
        if self.inverse.param_space_ != projected.space:
            raise ModelMismatchError(
                "the inverse was not fitted in this projected space (other layers or "
                "projection dimensions); fit it on ProjectedCurvature(ik.Curvature(target, "
                "train), projection).")
        fitted = self.inverse.fit_info_.get("fingerprint")
        if not self.allow_other_model and fitted is not None \
                and fitted != projected.fingerprint():
            raise ModelMismatchError(
                "the inverse was fitted for another model or projection (seed, kind) than "
                "this one; fit it again, or pass allow_other_model=True to reuse it knowingly.")

    def _check_store(self, store: GradientStore):
        expected = {"projection": self.projection.get_config(),
                    "layout": layout_config(self.target, self.projection),
                    "params": list(self.target.space.names),
                    "include_regularizer": bool(self.include_regularizer)}
        if not self.allow_other_model:
            expected["model_fingerprint"] = self.target.fingerprint()
        store.check_same(**expected)

    def query_gradients(self, query, runtime: Runtime | None = None) -> torch.Tensor:
        """``g̃_q = Pᵀ ∇f(z_q)`` ``[n_query, k]`` of the task's measurement."""
        rows = [g for _, g in iter_projected_gradients(self.target, query, self.projection,
                                                       runtime, of="measurement",
                                                       desc="projected query gradients")]
        return torch.cat(rows)

    def precondition(self, query, runtime: Runtime | None = None) -> torch.Tensor:
        """``(C̃ + λI)⁻¹ g̃_q`` ``[n_query, k]``."""
        self._check()
        return self.inverse.solve(self.query_gradients(query, runtime), runtime)

    def _train_blocks(self, train, runtime, block_size):
        if isinstance(train, GradientStore):
            self._check_store(train)
            yield from train.iter_blocks(block_size)
        else:
            yield from iter_projected_gradients(self.target, train, self.projection, runtime,
                                                include_regularizer=self.include_regularizer,
                                                desc="projected train gradients")

    def pairwise(self, query, train, runtime: Runtime | None = None,
                 block_size: int = 4096) -> torch.Tensor:
        """Scores ``[n_query, n_train]`` against a :class:`~influencekit.storage.GradientStore`
        (read block by block, never recomputed) or against training data (projected now)."""
        runtime = resolve_runtime(runtime)
        pre = self.precondition(query, runtime)
        blocks = [pre @ rows.to(device=pre.device, dtype=pre.dtype).T
                  for _, rows in self._train_blocks(train, runtime, block_size)]
        return torch.cat(blocks, dim=1)

    def self_influence(self, train, runtime: Runtime | None = None,
                       block_size: int = 4096) -> torch.Tensor:
        """``g̃_mᵀ (C̃ + λI)⁻¹ g̃_m`` ``[n_train]`` from a store or data."""
        runtime = resolve_runtime(runtime)
        self._check()
        out = []
        for _, rows in self._train_blocks(train, runtime, block_size):
            solved = self.inverse.solve(rows, runtime)
            out.append((solved * rows.to(solved.dtype)).sum(dim=1))
        return torch.cat(out)
