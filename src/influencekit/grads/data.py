"""The data layer: the only code that touches the user's batches.

What the user passes as data — a tuple of tensors, a dict of tensors, a ``Dataset`` or a
``DataLoader`` that keeps data-set order — becomes ordered batches here, with per-example weights.
Every other package goes through these functions to iterate, take rows, move and cast.

A batch is whatever the loader yields: a tuple/list of tensors, a dict of tensors, or a tensor;
its first dimension is the example. Scores are always indexed by position in the data set.

What is checked here, once, before any algorithm sees a batch (every refusal a
:class:`~influencekit.errors.DataError` naming the example, the problem and the fix):

- the container: tensors with a first (example) dimension that agree on the number of
  examples (a single example without a batch dimension is refused with the fix);
- a user's DataLoader visits every example once, in data-set order: shuffling, custom samplers
  and batch samplers, ``drop_last`` that drops examples, ``batch_size=None`` and a collate
  function that drops or adds examples are refused (:class:`~influencekit.errors.LoaderOrderError`);
- per-example weights: finite, non-negative, not all zero (the first bad example is named);
- the task-level checks of each batch (layout, labels, inputs, model mode) are given to
  :func:`iter_batches` as ``check=`` by the caller — ``Target.batch_validator()`` in
  :mod:`influencekit.task` — so they run once per batch, on concrete tensors, before any
  per-example transform.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
    default_collate,
)

from ..errors import (
    BatchLayoutError,
    DataError,
    EmptyDatasetError,
    LoaderOrderError,
)
from ..runtime import Runtime, resolve_runtime


class DictDataset(Dataset):
    """A data set of dicts from a dict of tensors sharing their first dimension
    (``{"input_ids": [n, T], "attention_mask": [n, T], "labels": [n]}``)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        check_example_dimension({f"tensor {k!r}": t for k, t in tensors.items()},
                                "dict data set")
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


def check_example_dimension(tensors: dict[str, torch.Tensor], what: str) -> int:
    """The number of examples of tensors that share their first (example) dimension.

    ``tensors``: ``{name shown in messages: tensor}``. Raises
    :class:`~influencekit.errors.BatchLayoutError` for a 0-d tensor (a single example without a
    batch dimension) or tensors that disagree on the number of examples.
    """
    scalar = [name for name, t in tensors.items() if t.dim() == 0]
    if scalar:
        raise BatchLayoutError(
            f"the {what} holds a 0-dimensional tensor ({scalar[0]}): every tensor needs a first "
            "dimension that runs over the examples. For a single example add it to every "
            "tensor: (x.unsqueeze(0), y.unsqueeze(0)), i.e. x[None], y[None].")
    sizes = {name: int(t.shape[0]) for name, t in tensors.items()}
    if len(set(sizes.values())) != 1:
        shapes = ", ".join(f"{name} has shape {list(t.shape)}" for name, t in tensors.items())
        raise BatchLayoutError(
            f"the {what} tensors disagree on the number of examples (their first dimension): "
            f"{shapes}. Give every tensor the same first dimension; a single example needs a "
            "batch dimension of 1 in every tensor (x[None], y[None]).")
    return next(iter(sizes.values()))


def as_dataset(data, what: str = "data set") -> Dataset:
    """The ``Dataset`` behind ``data`` (a loader's data set, or tensors wrapped in one)."""
    if isinstance(data, DataLoader):
        return data.dataset
    if _is_tensor_tuple(data):
        check_example_dimension({f"tensor {i}": t for i, t in enumerate(data)}, what)
        return TensorDataset(*data)
    if _is_tensor_dict(data):
        return DictDataset(data)
    if isinstance(data, Dataset):
        return data
    raise BatchLayoutError(f"the {what} must be a DataLoader, a Dataset, a tuple of tensors or "
                            f"a dict of tensors, got {type(data).__name__}.")


def as_loader(data, runtime: Runtime | None = None, what: str = "data set") -> DataLoader:
    """A DataLoader that visits every example once, in data-set order.

    A DataLoader given by the user must not reorder (a shuffling or custom sampler or batch
    sampler) nor drop examples (``drop_last=True`` when the last batch is short), and must batch
    (``batch_size`` not None): scores are indexed by position, so such a loader is refused with
    :class:`~influencekit.errors.LoaderOrderError`. Anything else is wrapped with the runtime's
    batch size.
    """
    runtime = resolve_runtime(runtime)
    if isinstance(data, DataLoader):
        check_loader_order(data, what)
        loader = data
    else:
        loader = DataLoader(as_dataset(data, what), batch_size=runtime.batch_size,
                            shuffle=False)
    if num_examples(loader) == 0:
        raise EmptyDatasetError(f"the {what} is empty: it holds no example. Pass at least one.")
    return loader


_KEEP_ORDER = ("Pass the Dataset itself (influencekit batches it in order), or a DataLoader "
               "with shuffle=False and the default sampler; select examples with "
               "torch.utils.data.Subset(dataset, indices) if you need a part.")


def check_loader_order(loader: DataLoader, what: str = "data set") -> None:
    """Raise :class:`~influencekit.errors.LoaderOrderError` unless ``loader`` visits every
    example of its data set once, in order (see :func:`as_loader`)."""
    if isinstance(loader.dataset, IterableDataset):
        if loader.num_workers > 0:
            raise LoaderOrderError(
                f"the {what} loader reads an IterableDataset with {loader.num_workers} workers: "
                "each worker yields its own copy (or share) in an order that varies, so "
                "positions are not defined. Use num_workers=0, or a map-style Dataset.")
        return
    sampler, batch_sampler = loader.sampler, loader.batch_sampler
    if isinstance(sampler, RandomSampler):
        raise LoaderOrderError(
            f"the {what} loader shuffles (shuffle=True): influence scores are indexed by "
            f"position in the data set, so they would belong to other examples. {_KEEP_ORDER}")
    if batch_sampler is None:
        raise LoaderOrderError(
            f"the {what} loader has batch_size=None (automatic batching off: each item of the "
            "data set would be taken for a whole batch). Give the DataLoader a batch_size, or "
            "pass the Dataset of single examples.")
    inner = getattr(batch_sampler, "sampler", None)
    reorders = [obj for obj in (sampler, inner)
                if obj is not None and type(obj) is not SequentialSampler]
    if type(batch_sampler) is not BatchSampler or reorders:
        used = type(batch_sampler if type(batch_sampler) is not BatchSampler
                    else reorders[0]).__name__
        raise LoaderOrderError(
            f"the {what} loader uses a {used}, which may reorder, repeat or skip examples: "
            f"influence scores are indexed by position in the data set. {_KEEP_ORDER}")
    if loader.drop_last or batch_sampler.drop_last:
        n = _length(loader.dataset)
        size = batch_sampler.batch_size
        if n is None or n % size:
            dropped = "" if n is None else f" {n % size}"
            raise LoaderOrderError(
                f"the {what} loader has drop_last=True, which drops the last{dropped} "
                f"example(s){'' if n is None else f' (positions {n - n % size} to {n - 1})'}; "
                "every example needs a score. Pass a loader with drop_last=False.",
                index=None if n is None else n - n % size)


def _length(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # an iterable data set without __len__
        return None


def num_examples(data) -> int:
    """The number of examples in ``data`` (anything :func:`as_loader` accepts, or a loader)."""
    if not isinstance(data, DataLoader):
        return len(as_dataset(data))
    n = _length(data.dataset)
    return n if n is not None else sum(batch_size(b) for b in data)


def batch_size(batch) -> int:
    """The number of examples in one batch (first dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_size(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size(batch[0])
    raise BatchLayoutError(f"cannot read the batch size of a {type(batch).__name__} batch; a "
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


def _indices(indices, n: int, what: str) -> torch.Tensor:
    """``indices`` as a long tensor ``[k]``, each in ``[0, n)``."""
    array = np.asarray(indices)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"indices into the {what} must be integers, got {array.dtype}.")
    idx = torch.as_tensor(array.astype(np.int64).reshape(-1), dtype=torch.long)
    bad = (idx < 0) | (idx >= n)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise DataError(f"index {int(idx[i])} (entry {i} of the indices) is outside the {what}, "
                        f"which holds {n} examples (positions 0 to {n - 1}).")
    return idx


def take(data, indices, runtime: Runtime | None = None, what: str = "data set"):
    """``data`` restricted to the rows ``indices``, in that order, in the same form: a tuple of
    tensors stays a tuple, a dict of tensors a dict, a DataLoader a DataLoader (same batch size
    and collate function) over a ``Subset``, any other data set a ``Subset``."""
    if _is_tensor_tuple(data) or _is_tensor_dict(data):
        idx = _indices(indices, num_examples(data), what)
        if _is_tensor_tuple(data):
            return type(data)(t[idx] for t in data)
        return {k: t[idx] for k, t in data.items()}
    dataset = as_loader(data, runtime, what).dataset
    idx = _indices(indices, num_examples(dataset), what)
    subset = Subset(dataset, idx.tolist())
    if isinstance(data, DataLoader):
        return DataLoader(subset, batch_size=data.batch_size or resolve_runtime(runtime).batch_size,
                          shuffle=False, collate_fn=data.collate_fn)
    return subset


def collate(data, indices, runtime: Runtime | None = None, what: str = "data set"):
    """One batch holding the rows ``indices`` of ``data`` (the layout a loader yields)."""
    dataset = as_dataset(data.dataset if isinstance(data, DataLoader) else data, what)
    idx = _indices(indices, num_examples(dataset), what)
    if isinstance(dataset, TensorDataset):
        return tuple(t[idx] for t in dataset.tensors)
    if isinstance(dataset, DictDataset):
        return {k: t[idx] for k, t in dataset.tensors.items()}
    collate_fn = data.collate_fn if isinstance(data, DataLoader) else default_collate
    return collate_fn([dataset[int(i)] for i in idx])


def check_weights(weights, n: int, runtime: Runtime | None = None) -> torch.Tensor | None:
    """Validate per-example weights ``[n]`` (None means all ones)."""
    if weights is None:
        return None
    runtime = resolve_runtime(runtime)
    weights = torch.as_tensor(weights, device=runtime.device)
    if weights.shape != (n,):
        raise DataError(f"weights must have shape [n] = [{n}] (one per example of the training "
                        f"data), got {tuple(weights.shape)}.")
    if weights.is_complex():
        raise DataError(f"weights must be real numbers, got {weights.dtype}.")
    bad = ~torch.isfinite(weights.double()) | (weights.double() < 0)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise DataError(f"the weight of example {i} is {weights[i].item()}: weights must be "
                        "finite and non-negative (0 leaves an example out).", index=i)
    if weights.double().sum() <= 0:
        raise DataError("weights sum to zero: at least one example needs a positive weight.")
    return weights


def iter_batches(loader: DataLoader, runtime: Runtime, dtype: torch.dtype | None,
                 weights: torch.Tensor | None = None, desc: str = "",
                 check: Callable[[object, int], None] | None = None,
                 first: int = 0) -> Iterator:
    """Yield ``(start, batch, weights [B])`` with batches moved to the runtime's device and
    floating tensors cast to ``dtype``; ``start`` is the position of the batch's first example
    (``first`` + its position in the loader: ``first`` is where the loader's data begin in a
    larger data set, e.g. a block of rows taken from it).

    ``check(batch, start)`` (e.g. ``target.batch_validator()``) is called on every batch before
    it is yielded. When the loop ends, the number of examples yielded must be the data set's
    length (a collate function that drops or adds examples is refused with
    :class:`~influencekit.errors.LoaderOrderError`).
    """
    start = first
    for batch in runtime.bar(loader, desc=desc, unit="batch"):
        size = batch_size(batch)
        batch = cast_batch(batch, dtype, runtime.device)
        if check is not None:
            check(batch, start)
        wdtype = dtype or torch.get_default_dtype()
        if weights is None:
            w = torch.ones(size, dtype=wdtype, device=runtime.device)
        else:
            w = weights[start - first:start - first + size].to(wdtype)
        yield start, batch, w
        start += size
    expected = _length(loader.dataset)
    if expected is not None and start - first != expected:
        raise LoaderOrderError(
            f"the loader yielded {start - first} examples but its data set holds {expected}: its "
            "collate function (or data set) drops or adds examples, so positions do not match "
            "the data set. Return one row per example from collate_fn.")


def batch_rows(batch, rows: slice):
    """The examples ``rows`` of one batch, in the same layout: every tensor whose first dimension
    is the batch size is sliced; anything else (a tensor shared by the batch) is kept."""
    size = batch_size(batch)

    def cut(value):
        if isinstance(value, torch.Tensor):
            return value[rows] if value.dim() and value.shape[0] == size else value
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(cut(v) for v in value)
        return value
    return cut(batch)


