"""K-FAC layer statistics: Kronecker factors and eigenvalue corrections, from layer hooks.

For a layer with per-example gradient ``G_i = Σ_t g_it a_itᵀ`` (:mod:`influencekit.grads.layers`),
the curvature block of the MEAN training loss is ``C = (1/Σw) Σ_i w_i E_y[vec G_i vec G_iᵀ]``
(row-major vec). K-FAC approximates it by ``S ⊗ A`` with

- ``A = (1/Σw) Σ_i w_i (1/T_i) Σ_t a_it a_itᵀ`` — inputs with a trailing 1 for the bias,
  AVERAGED over the T tokens (sequence positions / conv output positions) of each example;
- ``S = (1/Σw) Σ_i w_i E_y[Σ_t g_it g_itᵀ]`` — pre-activation (output) gradients of the
  per-example loss, SUMMED over tokens.

Token convention: tokens are treated as independent contributions (the "expand" setting), so
``S ⊗ A ≈ (1/Σw) Σ_i Σ_t E[g gᵀ] ⊗ a aᵀ`` keeps the scale of a gradient summed over tokens;
with one token (a plain ``[B, d]`` Linear) this is the usual K-FAC and it is exact whenever
``E_y[g_i g_iᵀ]`` is the same for every example or there is one example.

Embeddings and LayerNorm / RMSNorm (when the inverse asks for them, ``kinds=``) get their
statistics in the same passes from :mod:`influencekit.curvature.kfac_kinds`: an embedding's
diagonal A ``[V]`` (token frequencies; masked and padding-index tokens dropped), a norm's exact
curvature block as S (or its diagonal), with ``A = [[1]]``.

Padding: where the task gives a token mask ``[B, T]`` (``Task.token_mask``, e.g. the attention
mask) and a layer's token dimension is that T, only real tokens enter: masked tokens' ``a`` and
``g`` are zeroed and T_i counts the real tokens of example i.

The expectation over labels y (``labels``):

(:mod:`influencekit.curvature.labels`): ``"exact"`` (every target of
``task.predictive_targets``: the exact Fisher, which equals the GGN for cross-entropy on logits
and for squared error), ``"sampled"`` (``n_samples`` seeded draws per example; the only way for
a language model) or ``"empirical"`` (the true labels: the empirical Fisher).

All statistics are accumulated in float64. EK-FAC's eigenvalue correction is
``Λ[o, j] = (1/Σw) Σ_i w_i E_y[(Q_Sᵀ G_i Q_A)[o, j]²]``, with the same labels.

Both passes go through :func:`influencekit.curvature.statistics.accumulate`: under a Runtime
with several processes each sums its share of the batches and the sums, Σw and the example
count are all-reduced; with a :class:`~influencekit.storage.FitStore` the sums are written chunk
by chunk (passes ``factors/`` and ``corrections/``) and a killed fit resumes from them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing

import torch

from ..errors import NonFiniteError
from ..grads import (
    HookIncompatibleError,
    Layer,
    LayerPass,
    compute_dtype,
    layer_activations,
    layer_output_grads,
    live_params,
)
from ..runtime import Runtime
from ..storage import FitStore, fingerprint
from . import kfac_kinds
from .labels import LabelSets
from .statistics import Sums, accumulate

F64 = torch.float64


def iter_layer_batches(curvature, runtime: Runtime, layers: list[Layer],
                       labels: LabelSets, rows: range | None = None) -> Iterator:
    """Yield ``(w [B], counts, acts, label_sets)`` per batch of the examples ``rows`` (default
    all; whole batches of ``curvature.batch_grid``); ``w``, ``counts`` and ``coef`` float64,
    activations and output gradients in the compute dtype (each consumer casts one layer at a
    time to float64, so a batch never holds float64 copies of every layer at once).

    ``acts = {layer: a [B, T, width]}`` (masked tokens zeroed) and ``counts = {layer: T_i [B]}``
    (real tokens per example); ``label_sets`` is an iterator of ``(coef [B], {layer: g [B, T,
    d_out]})`` with ``coef = w_i · p(label)`` — consume it before advancing. One forward pass
    per batch and one backward pass per label set; sampled labels are drawn with
    ``labels.at(start)`` (the same draws however the data are split).
    """
    target = curvature.target
    dtype = compute_dtype(target, runtime)
    params = live_params(target, dtype, runtime.device)
    with LayerPass(target, layers) as lp:
        for start, batch, w in curvature.batches(runtime, dtype, rows, "K-FAC statistics"):
            outputs = lp.forward(params, batch)
            mask = target.token_mask(batch)
            acts, masks = {}, {}
            for layer in layers:
                module, x = lp.modules[layer.name], lp.inputs[layer.name]
                if layer.kind in kfac_kinds.KINDS:  # ids / normalised inputs, masked
                    _check_batch_input(layer, x, w.shape[0])
                    acts[layer.name], masks[layer.name] = kfac_kinds.statistic_inputs(
                        layer, module, x, mask)
                    continue
                a = layer_activations(layer, module, x)
                masks[layer.name] = _layer_mask(mask, a)
                acts[layer.name] = a if masks[layer.name] is None else a * masks[layer.name]
            counts = {name: _token_counts(masks[name], a) for name, a in acts.items()}
            label_sets = labels.at(start)(target.task, outputs, target.targets(batch, outputs))
            yield (w.to(F64), counts, acts,
                   _backward_each(target, lp, outputs, batch, label_sets, layers, acts, masks,
                                  w.to(F64), start))


def _check_batch_input(layer: Layer, x: torch.Tensor, size: int) -> None:
    """Refuse an input shared by the whole batch (position ids ``[1, T]``): its hooked output
    gradient is summed over the examples, so no per-example statistic can be formed."""
    got = x.shape[0] if x.dim() else 1
    if got != size:
        names = [n for n in (layer.weight, layer.bias) if n]
        raise HookIncompatibleError(
            f"module {layer.name!r} receives an input with first dimension {got} for a batch "
            f"of {size} (an input shared by the whole batch, e.g. position ids [1, T]), so "
            "K-FAC cannot see each example's part of its statistics. Leave its parameters "
            f"{names} out of the Target, or give them their own block: ik.block_diagonal("
            f"{{{names[0]!r}: ik.Diagonal(...)}}, default=ik.KFAC(...)).", layer.name)


def _layer_mask(mask: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor | None:
    """``[B, T, 1]`` float64 token mask for a layer whose tokens are the masked sequence."""
    if mask is None or a.shape[1] != mask.shape[1]:
        return None
    return mask.to(device=a.device, dtype=a.dtype)[..., None]


def _token_counts(mask: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor:
    """``[B]`` number of real tokens per example (T when unmasked)."""
    if mask is None:
        return torch.full((a.shape[0],), float(a.shape[1]), dtype=F64, device=a.device)
    return mask[..., 0].to(F64).sum(dim=1).clamp_min(1.0)


def _backward_each(target, lp, outputs, batch, label_sets, layers, acts, masks, w, start):
    label_sets = list(label_sets)
    for i, (labels, probs) in enumerate(label_sets):
        losses = target.loss_from_outputs(outputs, batch, labels)
        if not torch.isfinite(losses).all():
            i = int((~torch.isfinite(losses)).nonzero()[0, 0])
            raise NonFiniteError(f"the loss of example {start + i} is not finite while computing "
                                 "K-FAC statistics; check its inputs and label or use float64.",
                                 index=start + i)
        # the graph is kept only while another label set needs it: the last backward frees
        # the forward's saved tensors as it goes
        out_grads = lp.backward(losses, retain_graph=i < len(label_sets) - 1)
        grads = {}
        for layer in layers:
            g = out_grads[layer.name]
            if g is None:  # this layer does not reach the loss
                a = acts[layer.name]
                g = torch.zeros(a.shape[0], a.shape[1], layer.d_out, dtype=F64,
                                device=a.device)
            else:
                g = layer_output_grads(layer, g)
                if masks[layer.name] is not None:
                    g = g * masks[layer.name]
            grads[layer.name] = g
        yield w * probs.to(w.device), grads


def kronecker_statistics(curvature, runtime: Runtime, layers: list[Layer],
                         labels: LabelSets, store: FitStore | None = None,
                         config: dict | None = None) -> Sums:
    """The weighted sums behind A and S: ``values = {"A/<layer>": Σ_i w_i (1/T_i) Σ_t a aᵀ,
    "S/<layer>": Σ_i w_i E_y[Σ_t g gᵀ]}`` (float64, not yet divided by Σw), with Σw and the
    example count; sharded over ``runtime.context`` and written to ``store`` (pass
    ``factors/``) when given. ``config``: what the factors depend on besides the data (the
    store records it)."""
    def zeros():
        out = {}
        for layer in layers:
            if layer.kind in kfac_kinds.KINDS:
                a, s = kfac_kinds.factor_zeros(layer, runtime.device)
            else:
                a = torch.zeros(layer.width, layer.width, dtype=F64, device=runtime.device)
                s = torch.zeros(layer.d_out, layer.d_out, dtype=F64, device=runtime.device)
            out[f"A/{layer.name}"], out[f"S/{layer.name}"] = a, s
        return out

    def add(rows, sums):
        return _stream_weighted(curvature, runtime, layers, labels, rows,
                                lambda w, counts, acts, label_sets: _accumulate_factors(
                                    acts, counts, label_sets, w, sums, _other_kinds(layers)))

    if store is not None:
        config = {**(config or {}), "layers": [layer.to_dict() for layer in layers]}
    return accumulate(curvature, runtime, zeros, add, store=store, name="factors",
                      config=config)


def kronecker_factors(curvature, runtime: Runtime, layers: list[Layer],
                      labels: LabelSets, store: FitStore | None = None,
                      config: dict | None = None
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (A [width, width], S [d_out, d_out])}`` float64 (see the module docstring)."""
    return factors_of(kronecker_statistics(curvature, runtime, layers, labels, store, config),
                      layers)


def factors_of(sums: Sums, layers: list[Layer]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (A, S)}`` from :func:`kronecker_statistics` (divided by Σw, symmetrised)."""
    return {layer.name: (_sym(sums.values[f"A/{layer.name}"] / sums.weight),
                         _sym(sums.values[f"S/{layer.name}"] / sums.weight))
            for layer in layers}


def pop_factors(sums: Sums, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, S)`` of layer ``name`` as :func:`factors_of` gives them, REMOVING that layer's sums
    from ``sums.values`` and reusing their storage: a fit that takes its layers one by one holds
    each layer's statistics once (no second copy of every factor)."""
    return tuple(_sym_scaled_(sums.values.pop(f"{part}/{name}"), 1.0 / sums.weight)
                 for part in ("A", "S"))


def _sym_scaled_(m: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · (m + mᵀ) / 2`` with one temporary (the transpose's copy); ``m`` is consumed.
    A diagonal factor kept as a vector (an embedding's ``[V]``) is only scaled."""
    if m.dim() == 1:
        return m.mul_(scale)
    m += m.T.clone()
    return m.mul_(0.5 * scale)


def _stream_weighted(curvature, runtime, layers, labels, rows, accumulate_batch) -> float:
    """One pass over the examples ``rows`` calling ``accumulate_batch(w, counts, acts,
    label_sets)`` per batch; returns their Σw."""
    total = 0.0
    stream = iter_layer_batches(curvature, runtime, layers, labels, rows)
    with closing(stream):  # removes the hooks at once, also when this loop raises
        for w, counts, acts, label_sets in stream:
            total += float(w.sum())
            accumulate_batch(w, counts, acts, label_sets)
    return total


def _other_kinds(layers: list[Layer]) -> dict[str, Layer]:
    """The layers whose statistics :mod:`.kfac_kinds` computes (embeddings, norms), by name."""
    return {layer.name: layer for layer in layers if layer.kind in kfac_kinds.KINDS}


def _accumulate_factors(acts, counts, label_sets, w, sums, others):
    """Add one batch to the sums of A (mean over real tokens) and S (token sum), weighted."""
    for name, a in acts.items():
        if name in others:
            kfac_kinds.add_factor_a(others[name], a, w, counts[name], sums[f"A/{name}"])
            continue
        a = a.to(F64)
        scale = (w / counts[name])[:, None, None]
        sums[f"A/{name}"] += torch.einsum("bti,btj->ij", a * scale, a)
    for coef, grads in label_sets:
        for name, g in grads.items():
            if name in others:
                kfac_kinds.add_factor_s(others[name], acts[name], g, coef, sums[f"S/{name}"])
                continue
            g = g.to(F64)
            sums[f"S/{name}"] += torch.einsum("bto,btp->op", g * coef[:, None, None], g)


def eigenvalue_corrections(curvature, runtime: Runtime, layers: list[Layer],
                           labels: LabelSets,
                           bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
                           store: FitStore | None = None, config: dict | None = None
                           ) -> dict[str, torch.Tensor]:
    """``{layer: Λ [d_out, width]}``: mean squared per-example gradients in the Kronecker
    eigenbasis, ``bases = {layer: (Q_A, Q_S)}`` (float64). Sharded over ``runtime.context``;
    written to ``store`` (pass ``corrections/``, which records a fingerprint of the bases)."""
    def zeros():
        return {layer.name: kfac_kinds.correction_zeros(layer, runtime.device)
                if layer.kind in kfac_kinds.KINDS else
                torch.zeros(layer.d_out, layer.width, dtype=F64, device=runtime.device)
                for layer in layers}

    def add(rows, sums):
        return _stream_weighted(curvature, runtime, layers, labels, rows,
                                lambda w, counts, acts, label_sets: _accumulate_corrections(
                                    acts, label_sets, bases, sums, _other_kinds(layers)))

    if store is not None:
        config = {**(config or {}), "layers": [layer.to_dict() for layer in layers],
                  "bases": fingerprint({name: list(pair) for name, pair in bases.items()})}
    sums = accumulate(curvature, runtime, zeros, add, store=store, name="corrections",
                      config=config)
    return {name: s / sums.weight for name, s in sums.values.items()}


#: Elements of one chunk of projected per-example gradients ``[b, d_out, width]`` (float64) in
#: the correction pass: a wide layer's batch is taken a few examples at a time.
CORRECTION_CHUNK = 1 << 22


def _accumulate_corrections(acts, label_sets, bases, sums, others):
    """Add one batch of squared projected per-example gradients, weighted; the ``[b, d_out,
    width]`` projections are formed ``CORRECTION_CHUNK`` elements at a time (embeddings and
    norms: :func:`.kfac_kinds.add_correction`)."""
    for coef, grads in label_sets:
        for name, g in grads.items():
            if name in others:
                kfac_kinds.add_correction(others[name], acts[name], g, coef, bases[name][1],
                                          sums[name])
                continue
            rotated = acts[name].to(F64) @ bases[name][0]
            turned = g.to(F64) @ bases[name][1]
            step = max(1, CORRECTION_CHUNK // max(1, turned.shape[2] * rotated.shape[2]))
            for lo in range(0, turned.shape[0], step):
                projected = torch.bmm(turned[lo:lo + step].transpose(1, 2),
                                      rotated[lo:lo + step])
                sums[name] += torch.einsum("b,boj->oj", coef[lo:lo + step], projected.square_())


def _sym(m: torch.Tensor) -> torch.Tensor:
    """Symmetrised; a vector (a diagonal factor) is returned as it is."""
    return m if m.dim() == 1 else 0.5 * (m + m.T)
