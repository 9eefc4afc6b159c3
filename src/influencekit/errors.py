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


class DataError(InfluenceKitError):
    """Data that cannot be used as given: a loader that reorders or drops examples, a batch the
    Task cannot read, labels or inputs the model cannot take, bad weights.

    ``index`` is the position in the data set of the first offending example (``None`` when the
    problem is not tied to one example, e.g. a loader's sampler).
    """

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class LoaderOrderError(DataError):
    """A DataLoader that does not visit every example once in data-set order (shuffling or
    custom samplers and batch samplers, ``drop_last=True``, ``batch_size=None``, several workers
    over an iterable data set, a collate function that drops or adds examples): scores are
    indexed by position in the data set."""


class BatchLayoutError(DataError):
    """A batch does not have the layout the Task reads (a dict where the Task reads tuples, a
    missing key, tensors without a batch dimension or disagreeing on the number of examples)."""


class LabelError(DataError):
    """Labels the Task cannot use: out of the model's range, floating labels for
    classification, cross-entropy's ignore index (-100) where every example must count, or a
    shape that does not match the model's outputs."""


class InputDtypeError(DataError):
    """An input the model cannot take in its dtype (integer features into a floating model)."""


class ModelCallError(DataError):
    """The model raised an exception when called on an example (the original is its cause)."""


class TrainingModeError(InfluenceKitError):
    """The model has modules in training mode that make influence ill-defined (dropout, batch
    normalisation): call ``model.eval()`` first."""


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
