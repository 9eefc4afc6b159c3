"""Turning what the user passes as data into ordered batches, with per-example weights."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from ..errors import EmptyDatasetError
from ..func.grads import _batch_size
from ..runtime import Runtime
from ..task.target import _cast_floating


def as_loader(data, runtime: Runtime, what: str = "data set") -> DataLoader:
    """A DataLoader that visits examples in data-set order.

    ``data`` may be a DataLoader (it must not shuffle), a Dataset, or a tuple of tensors sharing
    their first dimension.
    """
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            raise ValueError(
                f"the {what} loader shuffles (shuffle=True); influence scores are indexed by "
                "position, so pass a loader with shuffle=False.")
        loader = data
    else:
        if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
            sizes = {t.shape[0] for t in data}
            if len(sizes) != 1:
                raise ValueError(f"the {what} tensors disagree on the number of examples: "
                                 f"{[t.shape[0] for t in data]}")
            data = TensorDataset(*data)
        if not isinstance(data, Dataset):
            raise TypeError(f"the {what} must be a DataLoader, a Dataset or a tuple of tensors, "
                            f"got {type(data).__name__}")
        loader = DataLoader(data, batch_size=runtime.batch_size, shuffle=False)
    if num_examples(loader) == 0:
        raise EmptyDatasetError(f"the {what} is empty: it holds no example. Pass at least one.")
    return loader


def num_examples(loader: DataLoader) -> int:
    try:
        return len(loader.dataset)
    except TypeError:  # an iterable dataset without __len__
        return sum(_batch_size(b) for b in loader)


def check_weights(weights, n: int, runtime: Runtime) -> torch.Tensor | None:
    """Validate per-example weights ``[n]`` (None means all ones)."""
    if weights is None:
        return None
    weights = torch.as_tensor(weights, device=runtime.device)
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape [n] = [{n}], got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("weights must be finite and non-negative")
    if weights.sum() <= 0:
        raise ValueError("weights sum to zero: at least one example needs a positive weight")
    return weights


def batches(loader: DataLoader, runtime: Runtime, dtype: torch.dtype,
            weights: torch.Tensor | None = None, desc: str = ""):
    """Yield ``(start, batch, weights[B])`` with batches moved to the runtime's device."""
    start = 0
    for batch in runtime.bar(loader, desc=desc, unit="batch"):
        size = _batch_size(batch)
        batch = _cast_floating(batch, dtype, runtime.device)
        if weights is None:
            w = torch.ones(size, dtype=dtype, device=runtime.device)
        else:
            w = weights[start:start + size].to(dtype)
        yield start, batch, w
        start += size
