"""Lazy inverses: methods that need the training data every time they solve (CG, LiSSA).

A lazy inverse keeps no fitted tensors. Its "fitted state" is a reference to the curvature
operator (target, training data, kind, weights) and the Runtime to run products with; every
:meth:`solve` runs curvature-vector products, each a pass over the training data.

Storing one is therefore honest but thin: :meth:`state_dict` is empty and the store keeps only the
configuration and ``fit_info_`` (incl. the model fingerprint). After
:func:`influencekit.storage.load_inverse`, re-attach the curvature with :meth:`attach` before
solving; until then :meth:`solve` raises :class:`NotFittedError` saying so.
"""

from __future__ import annotations

from ..errors import ModelMismatchError, NotFittedError, StoreError
from ..runtime import Runtime, resolve_runtime
from .base import REGISTRY, InverseCurvature


class LazyInverse(InverseCurvature):
    """Base of inverses that solve with curvature-vector products at solve time."""

    lazy = True

    def _fit(self, curvature, runtime):
        self._check_settings()
        self.curvature_ = curvature
        self.runtime_ = runtime

    def _check_settings(self) -> None:
        """Validate constructor arguments (raise ValueError naming the fix)."""

    def attach(self, curvature, runtime: Runtime | None = None):
        """Re-attach the curvature operator after loading from a store; returns self.

        The curvature must be of the same kind (else :class:`StoreError`) and of the model the
        inverse was fitted for (same parameter names, shapes and values, else
        :class:`ModelMismatchError`).
        """
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} was neither fitted nor loaded: call "
                                 ".fit(curvature) instead of .attach(curvature).")
        if curvature.kind != self.fit_info_["kind"]:
            raise StoreError(f"{type(self).__name__} was fitted on a {self.fit_info_['kind']!r} "
                             f"curvature; attach one of the same kind, not {curvature.kind!r}.")
        try:
            self.check_target(curvature.target)
        except ModelMismatchError as exc:
            raise ModelMismatchError(f"the curvature attached to {type(self).__name__} belongs "
                                     f"to another model: {exc}") from None
        self.curvature_ = curvature
        self.runtime_ = resolve_runtime(runtime)
        return self

    def check_fitted(self) -> None:
        super().check_fitted()
        if getattr(self, "curvature_", None) is None:
            raise NotFittedError(
                f"{type(self).__name__} was loaded from a store but solves with the training "
                "data, which is not stored: call .attach(ik.Curvature(target, train_data, "
                "kind=...)) with the same target and data before solving.")

    def _state_names(self):
        return []

    def load_state_dict(self, tensors, fit_info):
        super().load_state_dict(tensors, fit_info)
        self.curvature_ = None
        self.runtime_ = None
        return self

    def state_dict(self):
        """Empty: a lazy inverse has no fitted tensors (see the module docstring)."""
        InverseCurvature.check_fitted(self)
        return {}

    def solve(self, grads, runtime: Runtime | None = None):
        """As :meth:`InverseCurvature.solve`; the curvature products run with ``runtime``
        (default: the runtime given to ``fit`` / ``attach``)."""
        self._solve_runtime = runtime
        try:
            return super().solve(grads, runtime)
        finally:
            self._solve_runtime = None

    @property
    def product_runtime(self) -> Runtime:
        """The runtime curvature products use now (the solve's, else the fit's)."""
        return getattr(self, "_solve_runtime", None) or self.runtime_

    def _matvec(self, vectors):
        """(C + λI) v for rows ``vectors [k, p]`` (float64 out), one pass over the data."""
        cv = self.curvature_.matvec(vectors, self.product_runtime)
        return cv.to(vectors.dtype).to(vectors.device) + self.damping * vectors


REGISTRY.pop(LazyInverse.__name__, None)  # an abstract base, not a method one can store
