"""Errors that name the problem and the fix.

Every error raised on purpose by influencekit derives from :class:`InfluenceKitError`, which is
a ``ValueError`` so that existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations


class InfluenceKitError(ValueError):
    """Base class of every deliberate influencekit error."""


class NonFiniteError(InfluenceKitError):
    """A loss, gradient or curvature value is NaN or infinite.

    ``index`` is the position of the first offending example in the data set (or ``None`` when
    the value is not tied to one example).
    """

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class TaskOutputShapeError(InfluenceKitError):
    """A Task returned a per-example loss or measurement of the wrong shape."""


class NoTrainableParametersError(InfluenceKitError):
    """The Target selected no parameter that requires gradients."""


class EmptyDatasetError(InfluenceKitError):
    """A data set handed to influencekit holds no example."""


class CurvatureTooLargeError(InfluenceKitError):
    """A dense curvature matrix would not fit in the memory budget."""


class NotFittedError(InfluenceKitError):
    """A method that needs fitted state was called before ``fit``."""


class StoreError(InfluenceKitError):
    """A store on disk is missing, corrupt, or belongs to another model or configuration."""


class ConvergenceError(InfluenceKitError):
    """An iterative solver or optimiser did not reach its tolerance."""


class UnsupportedModuleError(InfluenceKitError):
    """A parameter lives in a module that a layer-wise method (hooks, K-FAC) cannot handle."""


class DataUnavailableError(InfluenceKitError):
    """An offline data set is not installed on this machine."""


class ModelMismatchError(InfluenceKitError):
    """Fitted state (an inverse, a store) belongs to another model, or to other parameter
    values of this one, than the model it is used with."""


class ConfigError(InfluenceKitError):
    """A CLI config (TOML file or ``--set`` flag) has a missing, unknown or ill-typed key.

    ``key`` is the dotted key (``"method.damping"``), ``value`` the bad value (None when the key
    is missing) and ``allowed`` what would be accepted, in words.
    """

    def __init__(self, key: str, value, allowed: str, problem: str = "is not allowed"):
        shown = "missing" if value is None and problem == "is missing" else repr(value)
        if problem == "is missing":
            message = f"config key '{key}' is missing; expected {allowed}"
        else:
            message = f"config key '{key}' = {shown} {problem}; allowed: {allowed}"
        super().__init__(message)
        self.key = key
        self.value = value
        self.allowed = allowed


class DistributedError(InfluenceKitError):
    """A distributed run is misconfigured (torchrun environment, ranks, shards, partitions)."""
