"""K-FAC and EK-FAC: block-diagonal (per layer) Kronecker-factored ``(C + λI)⁻¹``.

Per supported layer (``nn.Linear``, ``nn.Conv2d``, GPT-2's ``Conv1D``; bias included; with
``kinds=`` also ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``) the curvature block of the
mean training loss is approximated in the layer's gradient-matrix layout ``[d_out, width]``
(weight row o followed by bias o; see :mod:`influencekit.grads.layers`; a norm's parameters are
one column ``[m, 1]``, :mod:`.kfac_layout`) by

- K-FAC: ``S ⊗ A`` with eigenvalues ``s_o · a_j`` in the basis ``Q_S ⊗ Q_A``;
- EK-FAC: the same basis with the eigenvalues replaced by the mean squared per-example gradient
  in that basis (George et al. 2018; Grosse et al. 2023) — the best diagonal in that basis.

``A``, ``S`` and the corrections are defined in :mod:`influencekit.curvature.kfac` (scale: the
curvature of the MEAN loss, like ``Curvature.dense``). Cross-layer blocks are zero. Factors are
accumulated and eigendecomposed in float64, one layer at a time; the fitted eigenbases and
eigenvalues are then held in the fit's compute dtype, at least float32 (:func:`fitted_dtype`).
An :class:`~influencekit.L2Regularizer` adds its strength to every eigenvalue of the layers it
covers (∇²R = strength · I); other regularisers are refused.

Large runs: under a Runtime with several processes (``Runtime(context=DistContext.from_env())``)
the factor and correction passes are split over the processes' shares of the training data and
all-reduced, and the per-layer eigendecompositions (cost ~ d³) are split across processes by
layer and broadcast; every process ends with the same fitted state. ``fit(..., store=folder)``
writes the statistics chunk by chunk to a :class:`~influencekit.storage.FitStore`, so a killed
fit resumes and ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import torch

from ..curvature.kfac import eigenvalue_corrections, kronecker_statistics, pop_factors
from ..curvature.labels import LabelSets, resolve_label_mode
from ..curvature.statistics import store_config
from ..errors import InfluenceKitError, UnsupportedModuleError
from ..grads import Layer, compute_dtype, first_tied_parameter
from ..storage import FitStore
from ..task.regularizer import L2Regularizer
from .base import InverseCurvature, check_parameter_grads
from .kfac_layout import (
    ALL_KINDS,
    FACTORED_KINDS,
    decomposition_cost,
    dense_basis,
    eigh_or_diagonal,
    factored_index,
    factored_matrix,
    factored_parameters,
    factored_shape,
    find_factored_layers,
    rotate_in,
    rotate_out,
)

__all__ = ["ALL_KINDS", "EKFAC", "FACTORED_KINDS", "KFAC"]


F64 = torch.float64


class _KroneckerInverse(InverseCurvature):
    """Shared fitting and solving of K-FAC and EK-FAC (see the module docstring)."""

    corrected = False
    resumable = True

    def __init__(self, damping: float | str = "auto", labels: str = "auto", n_samples: int = 1,
                 seed: int = 0, modules: list[str] | None = None,
                 kinds: str | list[str] | None = None):
        self.damping = damping
        self.labels = labels
        self.n_samples = n_samples
        self.seed = seed
        self.modules = modules
        self.kinds = kinds

    # -- fitting ------------------------------------------------------------------------------
    def _fit(self, curvature, runtime, store=None):
        self._check_damping()
        target = curvature.target
        if curvature.kind == "hessian":
            raise InfluenceKitError(
                "K-FAC approximates a Gauss-Newton / Fisher curvature, not kind='hessian'. Use "
                "kind='ggn' (or 'fisher' / 'empirical_fisher'), or a Hessian method (ik.Exact, "
                "ik.CG).")
        mode = resolve_label_mode(target.task, curvature.kind, self.labels)
        layers = find_factored_layers(target, self.modules, self.kinds)
        _refuse_tied(layers)
        extra = _regularizer_shift(target, layers)
        store = FitStore.of(store)
        config = None
        if store is not None:
            config = {**store_config(curvature, runtime, compute_dtype(target, runtime)),
                      "labels": mode, "n_samples": self.n_samples, "seed": self.seed}
        sums = kronecker_statistics(curvature, runtime, layers, self._labels(mode), store,
                                    config)
        n_examples = sums.examples
        decompositions = _eigendecompositions(sums, layers, runtime.dist)  # empties sums
        del sums
        self.a_eigenvalues_, self.a_eigenvectors_ = [], []
        self.s_eigenvalues_, self.s_eigenvectors_ = [], []
        for layer in layers:
            ea, qa, es, qs = decompositions[layer.name]
            self.a_eigenvalues_.append(ea)
            self.a_eigenvectors_.append(qa)
            self.s_eigenvalues_.append(es)
            self.s_eigenvectors_.append(qs)
        if self.corrected:
            bases = {layer.name: (self.a_eigenvectors_[i], self.s_eigenvectors_[i])
                     for i, layer in enumerate(layers)}
            lam = eigenvalue_corrections(curvature, runtime, layers, self._labels(mode), bases,
                                         store, config)
            self.corrected_eigenvalues_ = [lam[layer.name] for layer in layers]
        self.fit_info_.update(n_examples=n_examples)
        self.fit_info_.update(labels=mode, layers=[layer.to_dict() for layer in layers])
        means = [float(self._eigenvalues(i).mean()) for i in range(len(layers))]
        dampings = [0.1 * m if self.damping == "auto" else float(self.damping) for m in means]
        self.layer_damping_ = torch.tensor(dampings, dtype=F64)
        self.regularizer_shift_ = torch.tensor(extra, dtype=F64)
        self.fit_info_.update(
            damping={layer.name: d for layer, d in zip(layers, dampings, strict=True)},
            mean_eigenvalue={layer.name: m for layer, m in zip(layers, means, strict=True)},
            regularizer_shift={layer.name: e for layer, e in zip(layers, extra, strict=True)},
            min_eigenvalue={layer.name: float(self._eigenvalues(i).min())
                            for i, layer in enumerate(layers)})
        self._check_invertible()
        self._cast_state(fitted_dtype(compute_dtype(target, runtime)))

    def _cast_state(self, dtype: torch.dtype) -> None:
        """Hold the per-layer eigenbases and eigenvalues in ``dtype`` (see :func:`fitted_dtype`;
        ``layer_damping_`` and ``regularizer_shift_`` stay float64)."""
        for attr in self._per_layer_names():
            setattr(self, attr, [t.to(dtype) for t in getattr(self, attr)])

    def _labels(self, mode):
        return LabelSets(mode, self.n_samples, self.seed)

    def _check_damping(self):
        if self.damping == "auto":
            return
        if isinstance(self.damping, str) or self.damping < 0:
            raise ValueError(f"damping must be a number >= 0 or 'auto', got {self.damping!r}")

    def _check_invertible(self):
        for i, layer in enumerate(self.layers_):
            shifted = self._eigenvalues(i) + self.regularizer_shift_[i] + self.layer_damping_[i]
            scale = float(self._eigenvalues(i).abs().max().clamp_min(1e-300))
            if float(shifted.min()) <= 1e-12 * scale:
                raise InfluenceKitError(
                    f"layer {layer.name!r}: the factored curvature plus damping is singular "
                    f"(smallest eigenvalue {float(shifted.min()):.3g}, damping "
                    f"{float(self.layer_damping_[i]):.3g}). Use damping > 0, e.g. "
                    f"{type(self).__name__}(damping='auto') (0.1 × mean eigenvalue per layer).")

    # -- fitted structure ---------------------------------------------------------------------
    @property
    def layers_(self) -> list[Layer]:
        self.check_fitted()
        return [Layer(**d) for d in self.fit_info_["layers"]]

    @property
    def damping_(self) -> float:
        """Mean over layers of the λ used (``fit_info_["damping"]`` has each layer's)."""
        self.check_fitted()
        return float(self.layer_damping_.mean())

    def damping_vector_(self) -> torch.Tensor:
        out = torch.empty(self.param_space_.numel, dtype=F64)
        for i, idx in enumerate(self._indices()):
            out[idx.reshape(-1)] = float(self.layer_damping_[i])
        return out

    def _eigenvalues(self, i: int) -> torch.Tensor:
        """``[d_out, width]`` eigenvalues of layer i's block in the basis ``Q_S ⊗ Q_A``."""
        if self.corrected:
            return self.corrected_eigenvalues_[i]
        return torch.outer(self.s_eigenvalues_[i], self.a_eigenvalues_[i])

    def _indices(self) -> list[torch.Tensor]:
        """``[d_out, width]`` flat positions of each layer (int64; built on each call and not
        kept: a cache would hold 8 bytes per parameter for as long as the inverse lives)."""
        space = self.param_space_
        return [factored_index(layer, space) for layer in self.layers_]

    # -- applying -----------------------------------------------------------------------------
    def _solve(self, grads, runtime=None):
        """Layer by layer on views of ``grads`` ``[k, p]`` (no index tensors), in float64."""
        device = self.a_eigenvectors_[0].device
        space = self.param_space_
        shapes = dict(zip(space.names, space.shapes, strict=True))
        rows = space.unflatten(grads)
        out = torch.empty_like(grads)
        out_rows = space.unflatten(out)
        for i, layer in enumerate(self.layers_):
            block = factored_matrix(layer, rows).to(device=device, dtype=F64)  # [k, d_out, w]
            qa, qs = self.a_eigenvectors_[i].to(F64), self.s_eigenvectors_[i].to(F64)
            rotated = rotate_in(block, qs, qa)
            del block
            shift = self.regularizer_shift_[i] + self.layer_damping_[i]
            rotated = rotated / (self._eigenvalues(i).to(F64) + shift)
            solved = rotate_out(rotated, qs, qa)
            for name, value in factored_parameters(layer, solved, shapes).items():
                out_rows[name].copy_(value)
        return out

    def matrix(self) -> torch.Tensor:
        """The fitted approximation of C (without damping, with ∇²R), dense ``[p, p]`` float64.

        For tests and small models only: block diagonal over layers, zero across layers.
        """
        self.check_fitted()
        p = self.param_space_.numel
        device = self.a_eigenvectors_[0].device
        out = torch.zeros(p, p, dtype=F64, device=device)
        for i, idx in enumerate(self._indices()):
            q = dense_basis(self.s_eigenvectors_[i].to(F64), self.a_eigenvectors_[i].to(F64),
                            factored_shape(self.layers_[i]))
            e = self._eigenvalues(i).to(F64).reshape(-1) + self.regularizer_shift_[i]
            flat = idx.reshape(-1).to(device)
            out[flat[:, None], flat[None, :]] = (q * e) @ q.T
        return out

    # -- per-parameter solving (factored scoring) ---------------------------------------------
    def parameter_blocks_(self) -> list[tuple[str, ...]]:
        """One block per factored layer: its weight and bias names."""
        return [tuple(n for n in (layer.weight, layer.bias) if n) for layer in self.layers_]

    def solve_per_parameter(self, grads, runtime=None):
        """Layer by layer in the ``[d_out, width]`` layout: ``Q_S ((Q_Sᵀ G Q_A) / (Λ + λ)) Q_Aᵀ``
        (see :meth:`InverseCurvature.solve_per_parameter`). Computed in the gradients' dtype
        (at least float32) from the fitted eigenbases; nothing of size ``[k, p]`` is formed."""
        self.check_fitted()
        space = self.param_space_
        check_parameter_grads(space, grads, self.parameter_blocks_())
        shapes = dict(zip(space.names, space.shapes, strict=True))
        out = {}
        for i, layer in enumerate(self.layers_):
            if not any(n in grads for n in (layer.weight, layer.bias) if n):
                continue
            g = factored_matrix(layer, grads)
            work = torch.promote_types(g.dtype, torch.float32)
            qa = self.a_eigenvectors_[i].to(device=g.device, dtype=work)
            qs = self.s_eigenvectors_[i].to(device=g.device, dtype=work)
            shift = self.regularizer_shift_[i] + self.layer_damping_[i]
            denominator = (self._eigenvalues(i) + shift).to(device=g.device, dtype=work)
            solved = rotate_out(rotate_in(g.to(work), qs, qa) / denominator, qs, qa)
            out.update(factored_parameters(layer, solved.to(g.dtype), shapes))
        return out

    # -- persistence --------------------------------------------------------------------------
    _PER_LAYER = ("a_eigenvalues_", "a_eigenvectors_", "s_eigenvalues_", "s_eigenvectors_")

    def _per_layer_names(self) -> tuple[str, ...]:
        return self._PER_LAYER + (("corrected_eigenvalues_",) if self.corrected else ())

    def _state_names(self):
        n = len(self.fit_info_["layers"])
        return ([f"{attr}{i}" for attr in self._per_layer_names() for i in range(n)]
                + ["layer_damping_", "regularizer_shift_"])

    def state_dict(self):
        self.check_fitted()
        out = {f"{attr}{i}": t for attr in self._per_layer_names()
               for i, t in enumerate(getattr(self, attr))}
        out.update(layer_damping_=self.layer_damping_, regularizer_shift_=self.regularizer_shift_)
        return out

    def load_state_dict(self, tensors, fit_info):
        info = dict(fit_info)
        n = len(info["layers"])
        self.fit_info_ = info
        missing = [k for k in self._state_names() if k not in tensors]
        if missing:
            del self.fit_info_
            raise ValueError(f"state for {type(self).__name__} lacks tensors {missing}")
        for attr in self._per_layer_names():
            setattr(self, attr, [tensors[f"{attr}{i}"] for i in range(n)])
        self.layer_damping_ = tensors["layer_damping_"]
        self.regularizer_shift_ = tensors["regularizer_shift_"]
        return self


class KFAC(_KroneckerInverse):
    """K-FAC: ``(S ⊗ A + λI)⁻¹`` per layer (block diagonal over layers).

    Args:
        damping: λ ≥ 0, or ``"auto"`` = 0.1 × the mean eigenvalue ``mean(s)·mean(a)`` of each
            layer's ``S ⊗ A`` (reported per layer in ``fit_info_["damping"]``; computed from
            the data part only, an L2 regulariser's strength is added on top and reported in
            ``fit_info_["regularizer_shift"]``).
        labels: ``"auto"`` (default: ``"exact"`` when the task enumerates its predictive
            distribution, else ``"sampled"``), ``"exact"`` (every class weighted by its predicted
            probability), ``"sampled"`` (``n_samples`` labels per example from the model's
            predictive distribution, generator seeded with ``seed``) for ``kind="ggn"`` /
            ``"fisher"``; a curvature of ``kind="empirical_fisher"`` always uses the true labels.
        n_samples, seed: for ``labels="sampled"``.
        modules: names of the modules to factor (default: every module of ``kinds`` holding
            Target parameters). Every Target parameter must lie in one of them; otherwise
            :class:`~influencekit.errors.UnsupportedModuleError` names the others.
        kinds: the layer kinds factored: None (default) = ``linear``, ``conv2d``, ``conv1d``;
            ``"all"`` adds ``embedding``, ``layernorm``, ``rmsnorm``; or a list of them.
            An ``nn.Embedding`` (one-hot inputs) has a DIAGONAL activation factor
            ``A = diag(token frequencies)`` ``[V]`` (masked and padding-index tokens never
            count), eigenbasis the identity (stored as an empty tensor, never ``V × V``), and the
            usual S ``[d, d]``; EK-FAC's corrections ``[d, V]`` come from each (example, token
            id) pair (exact for one example of one real token). A LayerNorm /
            RMSNorm gets its EXACT curvature block over its weight and bias (``m = d`` or ``2d``
            numbers) as S with ``A = [[1]]`` — K-FAC and EK-FAC then both equal the damped
            block; past ``curvature.kfac_kinds.NORM_EXACT_LIMIT`` (4,096) entries only its
            diagonal is kept. Embeddings whose input is shared by the batch (position ids
            ``[1, T]``) are refused with :class:`~influencekit.errors.UnsupportedModuleError`.

    Tied weights (GPT-2's ``wte`` tied to ``lm_head``) are refused: a parameter held by two
    factored modules has no Kronecker factorisation here. The error names the fixes: leave it
    out of the Target (e.g. ``params=["transformer.h"]``), or give it its own block,
    ``ik.block_diagonal({"transformer.wte.weight": ik.Diagonal(...)}, default=ik.KFAC(...))``.

    The curvature's ``kind`` decides what is approximated: ``"ggn"`` and ``"fisher"`` use the
    Fisher of the task's predictive distribution (equal to the GGN for cross-entropy on logits
    and for squared error; for another loss the Fisher is what is factored), ``"empirical_fisher"``
    the true labels, ``"hessian"`` is refused. ``solve`` costs two small matrix products per
    layer; ``matrix()`` builds the dense approximation for tests.

    Fitted: per layer the eigen-decompositions of A and S (``a_eigenvalues_``,
    ``a_eigenvectors_``, ``s_eigenvalues_``, ``s_eigenvectors_``, lists over ``layers_``; an
    empty eigenvector tensor means the identity: an embedding's A, a large norm's S),
    ``layer_damping_ [n_layers]`` (resolved λ per layer; ``damping_`` is their mean) and
    ``regularizer_shift_ [n_layers]``.
    """


class EKFAC(_KroneckerInverse):
    """EK-FAC: K-FAC's eigenbasis ``Q_S ⊗ Q_A`` with eigenvalues fitted to per-example gradients.

    Same arguments as :class:`KFAC`; ``damping="auto"`` is 0.1 × the mean corrected eigenvalue
    of each layer. Fitting takes two passes over the data (factors, then corrections); the
    corrections use the same labels as the factors (the same samples for ``"sampled"``).
    Fitted: as KFAC plus ``corrected_eigenvalues_`` (``[d_out, width]`` per layer).
    """

    corrected = True


def fitted_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype K-FAC / EK-FAC hold their fitted eigenbases and eigenvalues in: the fit's
    compute dtype, at least float32 (statistics and eigendecompositions are float64 either
    way; a float32 fit keeps half the bytes, a float64 fit keeps float64)."""
    return torch.promote_types(dtype, torch.float32)


def _eigendecompositions(sums, layers: list[Layer], dist) -> dict[str, tuple[torch.Tensor, ...]]:
    """``{layer: (a_values, a_vectors, s_values, s_vectors)}`` (float64) from the statistics
    ``sums`` (:func:`~influencekit.curvature.kfac.kronecker_statistics`), each layer's two
    eigendecompositions computed by the process that owns the layer (owners balance the cost
    ``width³ + d_out³``) and broadcast, so every process holds the same bits. ``sums.values``
    is emptied layer by layer as the factors are decomposed (one copy of the statistics)."""
    names = [layer.name for layer in layers]
    costs = [decomposition_cost(layer) for layer in layers]
    owned = {}
    for name in dist.for_modules(names, costs):
        a, s = pop_factors(sums, name)
        ea, qa = eigh_or_diagonal(a)
        del a
        es, qs = eigh_or_diagonal(s)
        del s
        for part, tensor in zip(_PARTS, (ea, qa, es, qs), strict=True):
            owned[f"{name}/{part}"] = tensor.contiguous()
    sums.values.clear()  # the layers other processes own
    owners = dist.module_owners(names, costs)
    shared = dist.broadcast_from_owners(owned, {f"{name}/{part}": owners[name]
                                                for name in names for part in _PARTS})
    return {name: tuple(shared[f"{name}/{part}"] for part in _PARTS) for name in names}


_PARTS = ("a_values", "a_vectors", "s_values", "s_vectors")


def _refuse_tied(layers: list[Layer]) -> None:
    """Refuse a parameter held by two factored modules (tied input / output embeddings)."""
    tied = first_tied_parameter(layers)
    if tied is None:
        return
    name, first, second = tied
    raise UnsupportedModuleError(
        f"parameter {name!r} is shared by modules {first!r} and {second!r} (tied weights, e.g. "
        "GPT-2's input and output embeddings); K-FAC factors one module per parameter and has "
        "no factorisation of a tied weight. Leave it out of the Target (e.g. only the attention "
        "and MLP modules: Target(params=['transformer.h']) for GPT-2), or give it its own "
        "block: ik.block_diagonal({" + repr(name) + ": ik.Diagonal(...)}, "
        "default=ik.KFAC(...)).")


def _regularizer_shift(target, layers: list[Layer]) -> list[float]:
    """∇²R as a multiple of the identity on each layer (0 without a regulariser)."""
    reg = target.regularizer
    if reg is None:
        return [0.0] * len(layers)
    if not isinstance(reg, L2Regularizer):
        raise InfluenceKitError(
            f"K-FAC/EK-FAC can only add an L2Regularizer's Hessian (strength · I), not "
            f"{type(reg).__name__}. Use ik.L2Regularizer, or an inverse that works on the full "
            "curvature (ik.Exact, ik.CG).")
    covered = None if reg.names is None else set(reg.names)
    shifts = []
    for layer in layers:
        names = [n for n in (layer.weight, layer.bias) if n]
        inside = {covered is None or n in covered for n in names}
        if len(inside) > 1:
            raise InfluenceKitError(
                f"the L2Regularizer covers only some parameters of layer {layer.name!r} "
                f"({names}); K-FAC needs the same strength on a whole layer. Regularise all of "
                "its parameters or none.")
        shifts.append(reg.strength if inside.pop() else 0.0)
    return shifts
