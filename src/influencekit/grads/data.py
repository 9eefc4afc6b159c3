"""The data layer: the only code that touches the user's batches.

What the user passes as data — a tuple of tensors, a dict of tensors, a ``Dataset`` or a
``DataLoader`` that keeps data-set order — becomes ordered batches here, with per-example weights.
Every other package goes through these functions to iterate, take rows, move and cast.

A batch is whatever the loader yields: a tuple/list of tensors, a dict of tensors, or a tensor;
its first dimension is the example. Scores are always indexed by position in the data set.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
    default_collate,
)

from ..errors import EmptyDatasetError, InfluenceKitError
from ..runtime import Runtime, resolve_runtime


class DictDataset(Dataset):
    """A data set of dicts from a dict of tensors sharing their first dimension
    (``{"input_ids": [n, T], "attention_mask": [n, T], "labels": [n]}``)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        sizes = {k: t.shape[0] for k, t in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise InfluenceKitError(f"the tensors of a dict data set disagree on the number of "
                                    f"examples: {sizes}; give every tensor the same first "
                                    "dimension.")
        self.tensors = dict(tensors)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, index):
        return {k: t[index] for k, t in self.tensors.items()}


def _is_tensor_tuple(data) -> bool:
    return isinstance(data, (tuple, list)) and bool(data) and all(
        isinstance(t, torch.Tensor) for t in data)


def _is_tensor_dict(data) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(t, torch.Tensor) for t in data.values())


def as_dataset(data, what: str = "data set") -> Dataset:
    """The ``Dataset`` behind ``data`` (a loader's data set, or tensors wrapped in one)."""
    if isinstance(data, DataLoader):
        return data.dataset
    if _is_tensor_tuple(data):
        sizes = [t.shape[0] for t in data]
        if len(set(sizes)) != 1:
            raise InfluenceKitError(f"the {what} tensors disagree on the number of examples: "
                                    f"{sizes}; give every tensor the same first dimension.")
        return TensorDataset(*data)
    if _is_tensor_dict(data):
        return DictDataset(data)
    if isinstance(data, Dataset):
        return data
    raise InfluenceKitError(f"the {what} must be a DataLoader, a Dataset, a tuple of tensors or "
                            f"a dict of tensors, got {type(data).__name__}.")


def as_loader(data, runtime: Runtime | None = None, what: str = "data set") -> DataLoader:
    """A DataLoader that visits every example once, in data-set order.

    A DataLoader given by the user must not reorder (a shuffling or custom sampler) nor drop
    examples (``drop_last=True``): scores are indexed by position, so such a loader is refused
    with :class:`InfluenceKitError`. Anything else is wrapped with the runtime's batch size.
    """
    runtime = resolve_runtime(runtime)
    if isinstance(data, DataLoader):
        _check_order(data, what)
        loader = data
    else:
        loader = DataLoader(as_dataset(data, what), batch_size=runtime.batch_size,
                            shuffle=False)
    if num_examples(loader) == 0:
        raise EmptyDatasetError(f"the {what} is empty: it holds no example. Pass at least one.")
    return loader


def _check_order(loader: DataLoader, what: str) -> None:
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler):
        raise InfluenceKitError(
            f"the {what} loader shuffles (shuffle=True); influence scores are indexed by "
            "position, so pass a loader with shuffle=False.")
    batch_sampler = loader.batch_sampler
    custom_batches = batch_sampler is not None and type(batch_sampler) is not BatchSampler
    if not isinstance(sampler, SequentialSampler) or custom_batches:
        used = type(batch_sampler if custom_batches else sampler).__name__
        raise InfluenceKitError(
            f"the {what} loader uses a {used}, which may reorder or skip examples; influence "
            "scores are indexed by position in the data set. Pass the Dataset itself (or a "
            "DataLoader with the default sequential sampler), and select examples with "
            "torch.utils.data.Subset if you need a part.")
    if loader.drop_last:
        try:
            n = len(loader.dataset)
        except TypeError:
            n = None
        if n is None or n % loader.batch_size:
            raise InfluenceKitError(
                f"the {what} loader has drop_last=True, which drops the last "
                f"{'' if n is None else n % loader.batch_size} examples; every example needs a "
                "score. Pass a loader with drop_last=False.")


def num_examples(data) -> int:
    """The number of examples in ``data`` (anything :func:`as_loader` accepts, or a loader)."""
    if not isinstance(data, DataLoader):
        return len(as_dataset(data))
    try:
        return len(data.dataset)
    except TypeError:  # an iterable dataset without __len__
        return sum(batch_size(b) for b in data)


def batch_size(batch) -> int:
    """The number of examples in one batch (first dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_size(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size(batch[0])
    raise InfluenceKitError(f"cannot read the batch size of a {type(batch).__name__} batch; a "
                            "batch is a tensor, or a tuple/list/dict of tensors whose first "
                            "dimension is the example.")


def cast_batch(batch, dtype: torch.dtype | None, device=None):
    """Move tensors (also inside tuples/lists/dicts) to ``device``; cast floating ones to
    ``dtype`` (``None`` keeps their dtype). Integer tensors (labels, token ids, masks) keep
    theirs."""
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point() and dtype is not None:
            return batch.to(dtype=dtype, device=device)
        return batch.to(device=device)
    if isinstance(batch, dict):
        return {k: cast_batch(v, dtype, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(cast_batch(v, dtype, device) for v in batch)
    return batch


def take(data, indices, runtime: Runtime | None = None, what: str = "data set"):
    """``data`` restricted to the rows ``indices``, in that order, in the same form: a tuple of
    tensors stays a tuple, a dict of tensors a dict, a DataLoader a DataLoader (same batch size
    and collate function) over a ``Subset``, any other data set a ``Subset``."""
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1), dtype=torch.long)
    if _is_tensor_tuple(data):
        return type(data)(t[idx] for t in data)
    if _is_tensor_dict(data):
        return {k: t[idx] for k, t in data.items()}
    subset = Subset(as_loader(data, runtime, what).dataset, idx.tolist())
    if isinstance(data, DataLoader):
        return DataLoader(subset, batch_size=data.batch_size or resolve_runtime(runtime).batch_size,
                          shuffle=False, collate_fn=data.collate_fn)
    return subset


def collate(data, indices, runtime: Runtime | None = None, what: str = "data set"):
    """One batch holding the rows ``indices`` of ``data`` (the layout a loader yields)."""
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1), dtype=torch.long)
    dataset = as_dataset(data.dataset if isinstance(data, DataLoader) else data, what)
    if isinstance(dataset, TensorDataset):
        return tuple(t[idx] for t in dataset.tensors)
    if isinstance(dataset, DictDataset):
        return {k: t[idx] for k, t in dataset.tensors.items()}
    return default_collate([dataset[int(i)] for i in idx])


def check_weights(weights, n: int, runtime: Runtime | None = None) -> torch.Tensor | None:
    """Validate per-example weights ``[n]`` (None means all ones)."""
    if weights is None:
        return None
    runtime = resolve_runtime(runtime)
    weights = torch.as_tensor(weights, device=runtime.device)
    if weights.shape != (n,):
        raise InfluenceKitError(f"weights must have shape [n] = [{n}], got "
                                f"{tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise InfluenceKitError("weights must be finite and non-negative")
    if weights.sum() <= 0:
        raise InfluenceKitError("weights sum to zero: at least one example needs a positive "
                                "weight")
    return weights


def iter_batches(loader: DataLoader, runtime: Runtime, dtype: torch.dtype | None,
                 weights: torch.Tensor | None = None, desc: str = "") -> Iterator:
    """Yield ``(start, batch, weights [B])`` with batches moved to the runtime's device and
    floating tensors cast to ``dtype``; ``start`` is the position of the batch's first example.
    """
    start = 0
    for batch in runtime.bar(loader, desc=desc, unit="batch"):
        size = batch_size(batch)
        batch = cast_batch(batch, dtype, runtime.device)
        wdtype = dtype or torch.get_default_dtype()
        if weights is None:
            w = torch.ones(size, dtype=wdtype, device=runtime.device)
        else:
            w = weights[start:start + size].to(wdtype)
        yield start, batch, w
        start += size


