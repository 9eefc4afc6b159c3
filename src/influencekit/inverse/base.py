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

from ..errors import InfluenceKitError, NotFittedError
from ..func.params import ParamSpace
from ..runtime import Runtime, resolve_runtime

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

    # -- fitting ------------------------------------------------------------------------------
    #: whether ``fit`` accepts ``store=`` (statistics written chunk by chunk, resumable)
    resumable = False

    def fit(self, curvature, runtime: Runtime | None = None, *, store=None):
        """Fit to a :class:`~influencekit.Curvature`; returns self.

        ``store``: a folder or :class:`~influencekit.storage.FitStore` where methods that
        accumulate statistics over the data (KFAC, EKFAC, Exact) write them chunk by chunk, so
        that a killed fit resumes where it stopped and ends with the same bits.
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
        return self

    @abstractmethod
    def _fit(self, curvature, runtime: Runtime) -> None:
        """Compute the fitted state (attributes ending in ``_``); may add to ``fit_info_``."""

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "fit_info_")

    def check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call "
                                 f".fit(ik.Curvature(target, train_data, kind=...)) first.")

    @property
    def param_space_(self) -> ParamSpace:
        self.check_fitted()
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
