"""The one interface every (C + λI)⁻¹ approximation follows.

Habits: the constructor only stores keyword arguments; ``fit(curvature, runtime)`` returns self;
fitted state ends in ``_``; ``solve(grads, runtime)`` applies the approximate inverse to rows of
``grads [k, p]`` (or one ``[p]``) and returns on their device and dtype; ``state_dict`` /
``load_state_dict`` / ``get_config`` make the fitted state storable; ``clone(**changes)`` is an
unfitted copy. ``damping`` is the same λ for every method; after ``fit``, ``damping_`` is the λ
actually used (what ``"auto"`` became) and ``damping_vector_()`` the λ of each parameter.
Everything outside ``inverse/`` (scoring, diagnostics) reads only this interface.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod

import torch

from ..errors import InfluenceKitError, ModelMismatchError, NotFittedError
from ..func.params import ParamSpace
from ..runtime import Runtime, release_freed_memory, resolve_runtime

REGISTRY: dict[str, type[InverseCurvature]] = {}


class InverseCurvature(ABC):
    """Base class: applies an approximation of ``(C + λI)⁻¹`` to gradients."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        REGISTRY[cls.__name__] = cls

    # -- configuration ------------------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [n for n in sig.parameters if n != "self"]

    def get_config(self) -> dict:
        """``{"method": class name, **constructor arguments}`` (JSON-serialisable)."""
        return {"method": type(self).__name__,
                **{n: getattr(self, n) for n in self._param_names()}}

    def clone(self, **changes) -> InverseCurvature:
        """An unfitted copy with the same configuration, ``changes`` applied (e.g.
        ``inverse.clone(damping=1e-2)``)."""
        config = self.get_config()
        method = config.pop("method")
        unknown = set(changes) - set(config)
        if unknown:
            raise ValueError(f"{method} has no setting {sorted(unknown)}; its settings are "
                             f"{sorted(config)}")
        config.update(changes)
        return REGISTRY[method](**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "method")
        return f"{type(self).__name__}({args})"

    #: Solves with passes over the training data (CG, LiSSA) instead of fitted tensors.
    lazy = False

    # -- fitting ------------------------------------------------------------------------------
    #: whether ``fit`` accepts ``store=`` (statistics written chunk by chunk, resumable)
    resumable = False

    def fit(self, curvature, runtime: Runtime | None = None, *, store=None,
            stationarity: bool = True):
        """Fit to a :class:`~influencekit.Curvature`; returns self.

        ``store``: a folder or :class:`~influencekit.storage.FitStore` where methods that
        accumulate statistics over the data (KFAC, EKFAC, Exact) write them chunk by chunk, so
        that a killed fit resumes where it stopped and ends with the same bits.

        ``stationarity`` (default True): then check that the Target's parameters are a minimiser
        of the training objective, in this inverse's metric — one gradient pass over the
        training data and one solve (:func:`influencekit.diagnostics.fit_stationarity`). The
        result is stored in ``fit_info_["stationarity"]`` and, when θ̂ is not a minimiser, a
        ``UserWarning`` says how far it is and what to do. ``False`` skips the check, as does
        a curvature with ``measures_stationarity = False`` (a projected one, which has no
        parameters of its own: check the unprojected Target).
        """
        if store is not None and not self.resumable:
            raise InfluenceKitError(
                f"{type(self).__name__} keeps no statistics to resume from, so it takes no "
                "store=; fit it without one (resumable fits: KFAC, EKFAC, Exact).")
        runtime = resolve_runtime(runtime)
        self.fit_info_ = {
            "kind": curvature.kind,
            "n_train": curvature.total_weight(runtime),
            "fingerprint": curvature.target.fingerprint(),
            "names": list(curvature.target.space.names),
            "shapes": [list(s) for s in curvature.target.space.shapes],
        }
        if store is None:
            self._fit(curvature, runtime)
        else:
            self._fit(curvature, runtime, store=store)
        release_freed_memory()
        if stationarity and getattr(curvature, "measures_stationarity", True):
            from ..diagnostics import fit_stationarity

            result = fit_stationarity(curvature, self, runtime)
            self.fit_info_["stationarity"] = result.to_json()
            result.warn(stacklevel=2)
        return self

    @abstractmethod
    def _fit(self, curvature, runtime: Runtime) -> None:
        """Compute the fitted state (attributes ending in ``_``); may add to ``fit_info_``."""

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "fit_info_")

    def check_target(self, target, allow_other_model: bool = False) -> None:
        """Raise :class:`~influencekit.errors.ModelMismatchError` unless this fitted inverse
        belongs to ``target``: the same parameter names and shapes and, unless
        ``allow_other_model``, the same values (the sha256 fingerprint recorded at fit)."""
        InverseCurvature.check_fitted(self)  # fitted or loaded (a lazy one may be unattached)
        if self.param_space_ != target.space:
            raise ModelMismatchError(
                "the inverse was fitted for other parameters "
                f"({list(self.param_space_.names)[:4]}...) than this Target selects "
                f"({list(target.space.names)[:4]}...); fit it on a Curvature of this Target.")
        if allow_other_model:
            return
        fitted = self.fit_info_.get("fingerprint")
        if fitted is not None and fitted != target.fingerprint():
            raise ModelMismatchError(
                "the inverse was fitted at other parameter values than the Target's model has "
                "now (another model of the same shape, or this one trained further after "
                "fitting): its curvature does not describe this model. Fit it again on "
                "ik.Curvature(target, train), or pass Influence(..., allow_other_model=True) "
                "to reuse it knowingly as an approximation.")

    def check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call "
                                 f".fit(ik.Curvature(target, train_data, kind=...)) first.")

    @property
    def param_space_(self) -> ParamSpace:
        InverseCurvature.check_fitted(self)  # also for a loaded lazy inverse not yet attached
        return ParamSpace(tuple(self.fit_info_["names"]),
                          tuple(tuple(s) for s in self.fit_info_["shapes"]))

    @property
    def n_train_(self) -> float:
        """Σ w of the training data the curvature was fitted on (n of the conventions table)."""
        self.check_fitted()
        return self.fit_info_["n_train"]

    @property
    def damping_(self) -> float:
        """The λ used (after ``fit``): ``damping``, or the mean over layers of what
        ``damping="auto"`` resolved to (per layer in ``fit_info_["damping"]``)."""
        self.check_fitted()
        return float(self.damping)

    def damping_vector_(self) -> torch.Tensor:
        """``[p]`` float64: the λ added to each parameter's diagonal of C (uniform unless the
        method damps layers differently)."""
        return torch.full((self.param_space_.numel,), self.damping_, dtype=torch.float64)

    # -- applying -----------------------------------------------------------------------------
    def solve(self, grads: torch.Tensor, runtime: Runtime | None = None) -> torch.Tensor:
        """``(C + λI)⁻¹ g`` for ``grads [p]`` or ``[k, p]``; same shape, dtype and device out.

        ``runtime`` is how matrix-free methods (CG, LiSSA) run their curvature products
        (default: the runtime they were fitted with).
        """
        self.check_fitted()
        p = self.param_space_.numel
        if grads.shape[-1] != p or grads.dim() not in (1, 2):
            raise ValueError(f"grads must have shape [p] or [k, p] with p = {p}, got "
                             f"{tuple(grads.shape)}")
        single = grads.dim() == 1
        rows = grads[None] if single else grads
        out = self._solve(rows, runtime).to(dtype=grads.dtype, device=grads.device)
        return out[0] if single else out

    @abstractmethod
    def _solve(self, grads: torch.Tensor, runtime: Runtime | None) -> torch.Tensor:
        """Apply the fitted inverse to ``grads [k, p]`` (any dtype/device out)."""

    # -- per-parameter solving (the factored scoring path) ------------------------------------
    def parameter_blocks_(self) -> list[tuple[str, ...]] | None:
        """The groups of parameter names over which the fitted inverse is block diagonal
        (every entry coupling two groups is zero), or ``None`` when it couples all parameters.

        Block-diagonal inverses (KFAC, EKFAC, Diagonal, Identity, block_diagonal of any methods)
        solve block by block in :meth:`solve_per_parameter` without forming ``[k, p]``; scoring
        takes its factored path for them (:class:`~influencekit.Influence`).
        """
        return None

    def solve_per_parameter(self, grads: dict[str, torch.Tensor],
                            runtime: Runtime | None = None) -> dict[str, torch.Tensor]:
        """``(C + λI)⁻¹ g`` for gradients given per parameter: ``{name: [k, *shape]}`` in, the
        same keys, shapes, dtype and device out.

        ``grads`` holds every parameter, or for a block-diagonal inverse any union of whole
        blocks of :meth:`parameter_blocks_` (the other blocks are independent). This default
        flattens to ``[k, p]`` and calls :meth:`solve`; block-diagonal inverses override it to
        solve one block at a time.
        """
        self.check_fitted()
        space = self.param_space_
        check_parameter_grads(space, grads, None)
        flat = space.flatten(grads, batch_dims=1)
        solved = space.unflatten(self.solve(flat, runtime))
        return {name: solved[name].contiguous() for name in grads}

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fitted tensors by name (no configuration; see :meth:`get_config`)."""
        self.check_fitted()
        return {name: getattr(self, name) for name in self._state_names()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], fit_info: dict):
        """Restore fitted state saved by :meth:`state_dict`; returns self."""
        missing = [n for n in self._state_names() if n not in tensors]
        if missing:
            raise ValueError(f"state for {type(self).__name__} lacks tensors {missing}")
        for name in self._state_names():
            setattr(self, name, tensors[name])
        self.fit_info_ = dict(fit_info)
        return self

    @abstractmethod
    def _state_names(self) -> list[str]:
        """Names of the tensor attributes that make up the fitted state."""


def check_parameter_grads(space: ParamSpace, grads: dict[str, torch.Tensor],
                          blocks: list[tuple[str, ...]] | None) -> int:
    """Check per-parameter gradients ``{name: [k, *shape]}`` against ``space``; returns k.

    ``blocks=None``: every parameter must be there; else the names must be a union of whole
    blocks.
    """
    shapes = dict(zip(space.names, space.shapes, strict=True))
    unknown = [n for n in grads if n not in shapes]
    if unknown:
        raise ValueError(f"gradients given for parameters {unknown[:4]} that the inverse was "
                         f"not fitted on (its parameters: {list(space.names)[:4]} ...)")
    if blocks is None:
        missing = [n for n in space.names if n not in grads]
        if missing:
            raise ValueError(f"this inverse couples all parameters: gradients for every one are "
                             f"needed, {missing[:4]} are missing")
    else:
        partial = [b for b in blocks if any(n in grads for n in b)
                   and not all(n in grads for n in b)]
        if partial:
            raise ValueError(f"gradients must cover whole blocks of the inverse; block "
                             f"{list(partial[0])} is only partly given")
    if not grads:
        return 0
    sizes = {t.shape[0] if t.dim() else -1 for t in grads.values()}
    if len(sizes) != 1:
        raise ValueError(f"per-parameter gradients must all have the same number of rows k, "
                         f"got {sorted(sizes)}")
    k = sizes.pop()
    for name, t in grads.items():
        if tuple(t.shape[1:]) != tuple(shapes[name]):
            raise ValueError(f"gradient of {name!r} has shape {tuple(t.shape)}, expected "
                             f"[k, {', '.join(map(str, shapes[name]))}]")
    return k
