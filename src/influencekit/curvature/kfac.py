"""K-FAC layer statistics: Kronecker factors and eigenvalue corrections, from layer hooks.

For a layer with per-example gradient ``G_i = Σ_t g_it a_itᵀ`` (:mod:`influencekit.grads.hooks`),
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

The expectation over labels y (``labels``):

- ``"exact"``: every target of ``task.predictive_targets`` (all classes weighted by their
  predicted probability; sigma points for squared error): the exact Fisher, which equals the GGN
  for cross-entropy on logits and for squared error;
- ``"sampled"``: ``n_samples`` labels per example drawn from that predictive distribution with
  a seeded generator (the "true Fisher" estimate of other K-FAC codes);
- ``"empirical"``: the true labels (empirical Fisher).

All statistics are accumulated in float64. EK-FAC's eigenvalue correction is
``Λ[o, j] = (1/Σw) Σ_i w_i E_y[(Q_Sᵀ G_i Q_A)[o, j]²]``, with the same labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing

import torch

from ..errors import InfluenceKitError, NonFiniteError
from ..grads.data import batches, check_weights, num_examples
from ..grads.hooks import (
    HookedLayer,
    LayerCapture,
    backward_leaves,
    layer_activations,
    layer_modules,
    layer_output_grads,
    live_params,
)
from ..grads.stream import compute_dtype
from ..runtime import Runtime
from ..task.target import _cast_floating

LABEL_MODES = ("exact", "sampled", "empirical")
F64 = torch.float64


def label_mode(kind: str, labels: str) -> str:
    """Which labels the statistics use for a Curvature ``kind`` and a requested ``labels`` mode."""
    if labels not in LABEL_MODES:
        raise ValueError(f"labels={labels!r} is not one of {LABEL_MODES}")
    if kind == "empirical_fisher":
        return "empirical"
    if kind in ("ggn", "fisher"):
        if labels == "empirical":
            raise InfluenceKitError(
                f"labels='empirical' approximates the empirical Fisher, but the curvature has "
                f"kind={kind!r}. Fit on ik.Curvature(..., kind='empirical_fisher'), or use "
                "labels='exact' or 'sampled'.")
        return labels
    raise InfluenceKitError(
        f"K-FAC approximates a Gauss-Newton / Fisher curvature, not kind={kind!r}. Use "
        "kind='ggn' (or 'fisher' / 'empirical_fisher'), or a Hessian method (ik.Exact, ik.CG).")


class LabelSampler:
    """Label sets ``[(targets, weights [B])]`` for one batch of outputs, per label mode."""

    def __init__(self, mode: str, n_samples: int = 1, seed: int = 0):
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        self.mode = mode
        self.n_samples = n_samples
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, task, outputs, true_targets):
        size = outputs.shape[0]
        if self.mode == "empirical":
            return [(true_targets, torch.ones(size, dtype=F64, device=outputs.device))]
        try:
            targets, probs = task.predictive_targets(outputs.detach())
        except NotImplementedError as exc:
            raise InfluenceKitError(
                f"labels={self.mode!r} needs the labels' predictive distribution, but "
                f"{type(task).__name__} does not define predictive_targets(). Implement it, or "
                "fit on ik.Curvature(..., kind='empirical_fisher') (true labels).") from exc
        probs = probs.to(F64)
        if self.mode == "exact":
            return [(t, probs[s]) for s, t in enumerate(targets)]
        draws = torch.multinomial(probs.T.cpu(), self.n_samples, replacement=True,
                                  generator=self.generator).to(outputs.device)  # [B, m]
        stacked = torch.stack(list(targets))                                     # [S, B, ...]
        rows = torch.arange(size, device=outputs.device)
        weight = torch.full((size,), 1.0 / self.n_samples, dtype=F64, device=outputs.device)
        return [(stacked[draws[:, j], rows], weight) for j in range(self.n_samples)]


def iter_layer_batches(curvature, runtime: Runtime, layers: list[HookedLayer],
                       sampler: LabelSampler) -> Iterator:
    """Yield ``(w [B], acts, label_sets)`` per batch, all float64.

    ``acts = {layer: a [B, T, width]}``; ``label_sets`` is an iterator of
    ``(coef [B], {layer: g [B, T, d_out]})`` with ``coef = w_i · p(label)`` — consume it before
    advancing. One forward pass per batch and one backward pass per label set.
    """
    target = curvature.target
    dtype = compute_dtype(target, runtime)
    loader = curvature.loader(runtime)
    weights = check_weights(curvature.weights, num_examples(loader), runtime)
    params = live_params(target, dtype, runtime.device)
    modules = layer_modules(target, layers)
    with LayerCapture(modules) as cap:
        for start, batch, w in batches(loader, runtime, dtype, weights, desc="K-FAC statistics"):
            cap.reset()
            outputs = target.outputs(params, batch)
            acts = {layer.name: layer_activations(layer, modules[layer.name],
                                                  cap.inputs[layer.name]).to(F64)
                    for layer in layers}
            label_sets = sampler(target.task, outputs, target._targets(batch, outputs))
            yield w.to(F64), acts, _backward_each(target, params, outputs, label_sets, layers,
                                                  acts, cap, w.to(F64), start)


def _backward_each(target, params, outputs, label_sets, layers, acts, cap, w, start):
    leaves = backward_leaves(layers, params)
    for labels, probs in label_sets:
        losses = target.task.loss(outputs, _cast_floating(labels, outputs.dtype, outputs.device))
        losses = target._check_shape(losses, outputs, "loss")
        if not torch.isfinite(losses).all():
            i = int((~torch.isfinite(losses)).nonzero()[0, 0])
            raise NonFiniteError(f"the loss of example {start + i} is not finite while computing "
                                 "K-FAC statistics; check its inputs and label or use float64.",
                                 index=start + i)
        cap.output_grads.clear()
        torch.autograd.grad(losses.sum(), leaves, retain_graph=True, allow_unused=True)
        grads = {}
        for layer in layers:
            g = cap.output_grads.get(layer.name)
            if g is None:  # this layer does not reach the loss
                a = acts[layer.name]
                g = a.new_zeros(a.shape[0], a.shape[1], layer.d_out)
            else:
                g = layer_output_grads(layer, g).to(F64)
            grads[layer.name] = g
        yield w * probs.to(w.device), grads


def kronecker_factors(curvature, runtime: Runtime, layers: list[HookedLayer],
                      sampler: LabelSampler) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (A [width, width], S [d_out, d_out])}`` float64 (see the module docstring)."""
    a_sum = {layer.name: torch.zeros(layer.width, layer.width, dtype=F64, device=runtime.device)
             for layer in layers}
    s_sum = {layer.name: torch.zeros(layer.d_out, layer.d_out, dtype=F64, device=runtime.device)
             for layer in layers}
    total = _stream_weighted(curvature, runtime, layers, sampler,
                             lambda w, acts, label_sets: _accumulate_factors(
                                 acts, label_sets, w, a_sum, s_sum))
    return {name: (_sym(a_sum[name] / total), _sym(s_sum[name] / total)) for name in a_sum}


def _stream_weighted(curvature, runtime, layers, sampler, accumulate) -> float:
    """One pass over the data calling ``accumulate(w, acts, label_sets)`` per batch; Σw."""
    total = 0.0
    stream = iter_layer_batches(curvature, runtime, layers, sampler)
    with closing(stream):  # removes the hooks at once, also when this loop raises
        for w, acts, label_sets in stream:
            total += float(w.sum())
            accumulate(w, acts, label_sets)
    return total


def _accumulate_factors(acts, label_sets, w, a_sum, s_sum):
    """Add one batch to the sums of A (token mean) and S (token sum), weighted."""
    for name, a in acts.items():
        scale = (w / a.shape[1])[:, None, None]
        a_sum[name] += torch.einsum("bti,btj->ij", a * scale, a)
    for coef, grads in label_sets:
        for name, g in grads.items():
            s_sum[name] += torch.einsum("bto,btp->op", g * coef[:, None, None], g)


def eigenvalue_corrections(curvature, runtime: Runtime, layers: list[HookedLayer],
                           sampler: LabelSampler,
                           bases: dict[str, tuple[torch.Tensor, torch.Tensor]]
                           ) -> dict[str, torch.Tensor]:
    """``{layer: Λ [d_out, width]}``: mean squared per-example gradients in the Kronecker
    eigenbasis, ``bases = {layer: (Q_A, Q_S)}`` (float64)."""
    sums = {layer.name: torch.zeros(layer.d_out, layer.width, dtype=F64, device=runtime.device)
            for layer in layers}
    total = _stream_weighted(curvature, runtime, layers, sampler,
                             lambda w, acts, label_sets: _accumulate_corrections(
                                 acts, label_sets, bases, sums))
    return {name: s / total for name, s in sums.items()}


def _accumulate_corrections(acts, label_sets, bases, sums):
    """Add one batch of squared projected per-example gradients, weighted."""
    rotated = {name: a @ bases[name][0] for name, a in acts.items()}
    for coef, grads in label_sets:
        for name, g in grads.items():
            projected = torch.bmm((g @ bases[name][1]).transpose(1, 2), rotated[name])
            sums[name] += torch.einsum("b,boj->oj", coef, projected ** 2)


def _sym(m: torch.Tensor) -> torch.Tensor:
    return 0.5 * (m + m.T)
