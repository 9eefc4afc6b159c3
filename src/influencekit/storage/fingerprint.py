"""A fingerprint of a data set's contents, so that a store can refuse other data.

:func:`data_fingerprint` hashes every example's values and labels (every field of every example,
with its dtype and shape), in data-set order. The same examples give the same fingerprint
whether they come as a tuple of tensors, a ``Dataset`` or a ``DataLoader`` of any batch size;
changing one label, one feature value, a dtype or the order gives another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from ..errors import InfluenceKitError

FINGERPRINT_VERSION = "data-v1"


class _Field:
    """Running hash of one field (e.g. the labels) over all examples."""

    def __init__(self):
        self.data = hashlib.sha256()
        self.headers = hashlib.sha256()
        self.first_header: str | None = None
        self.uniform = True
        self.count = 0

    def add(self, header: str, data, count: int = 1) -> None:
        """``count`` examples that share ``header`` (dtype and per-example shape)."""
        if self.first_header is None:
            self.first_header = header
        elif header != self.first_header:
            self.uniform = False
        self.headers.update(f"{header}*{count};".encode())
        self.data.update(data)
        self.count += count

    def summary(self) -> str:
        # Per-example headers only count when they vary, so one block of n rows and n
        # single rows with the same header give the same summary.
        headers = self.first_header if self.uniform else self.headers.hexdigest()
        return f"{self.count}|{headers}|{self.data.hexdigest()}"


class _Hasher:
    def __init__(self):
        self.fields: dict[str, _Field] = {}

    def _field(self, path: str) -> _Field:
        return self.fields.setdefault(path, _Field())

    def add_block(self, path: str, tensor: torch.Tensor) -> None:
        """A tensor whose first dimension runs over examples (a tuple-of-tensors field)."""
        tensor = _as_tensor(tensor, path)
        header = f"{tensor.dtype}{list(tensor.shape[1:])}"
        self._field(path).add(header, _tensor_bytes(tensor), count=int(tensor.shape[0]))

    def add_example(self, path: str, value) -> None:
        """One example's value: a tensor/array/number/string or a dict/tuple/list of them."""
        if isinstance(value, Mapping):
            for key in sorted(value, key=str):
                self.add_example(f"{path}[{key!r}]", value[key])
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                self.add_example(f"{path}[{i}]", item)
        elif isinstance(value, (str, bytes)):
            data = value.encode() if isinstance(value, str) else value
            self._field(path).add(f"{type(value).__name__}[{len(data)}]", data)
        else:
            tensor = _as_tensor(value, path)
            self._field(path).add(f"{tensor.dtype}{list(tensor.shape)}", _tensor_bytes(tensor))

    def hexdigest(self, n: int) -> str:
        h = hashlib.sha256(f"{FINGERPRINT_VERSION}|n={n}".encode())
        for path in sorted(self.fields):
            h.update(f"|{path}:{self.fields[path].summary()}".encode())
        return h.hexdigest()


def _as_tensor(value, path: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (bool, np.bool_)):
        return torch.tensor(bool(value))
    if isinstance(value, int):  # as default_collate turns Python numbers into tensors
        return torch.tensor(value, dtype=torch.int64)
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float64)
    if isinstance(value, (np.ndarray, np.generic)):
        return torch.as_tensor(np.array(value, order="C"))  # keeps 0-d scalars 0-d
    raise InfluenceKitError(
        f"data_fingerprint cannot hash a {type(value).__name__} in the field "
        f"{path or '(the example itself)'}; examples must hold tensors, numpy arrays, numbers or "
        "strings (possibly in tuples, lists or dicts). Convert that field first.")


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def data_fingerprint(data) -> str:
    """sha256 (hex) of a data set's examples: every field's values, dtype and shape, in order.

    ``data``: a tuple/list of tensors sharing their first dimension, a ``Dataset`` (examples may
    be tensors, tuples, lists or dicts of tensors, arrays, numbers or strings) or a
    ``DataLoader`` (its data set is hashed in index order; an iterable data set is hashed in
    the order it yields). Independent of batch size and of the container: ``(x, y)``,
    ``TensorDataset(x, y)`` and ``DataLoader(TensorDataset(x, y), batch_size=b)`` agree.
    """
    hasher = _Hasher()
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor)
                                                        for t in data):
        data = TensorDataset(*data) if len({t.shape[0] for t in data}) == 1 else data
        if not isinstance(data, TensorDataset):
            raise InfluenceKitError(f"the tensors disagree on the number of examples: "
                                    f"{[t.shape[0] for t in data]}; pass tensors that share "
                                    "their first dimension.")
    if isinstance(data, TensorDataset):
        for i, tensor in enumerate(data.tensors):
            hasher.add_block(f"[{i}]", tensor)
        return hasher.hexdigest(len(data))
    if isinstance(data, IterableDataset):
        n = 0
        for example in data:
            hasher.add_example("", example)
            n += 1
        return hasher.hexdigest(n)
    if isinstance(data, Dataset):
        try:
            n = len(data)
        except TypeError as exc:
            raise InfluenceKitError(f"data_fingerprint needs a Dataset with a length (or an "
                                    f"IterableDataset); {type(data).__name__} has none.") from exc
        for i in range(n):
            hasher.add_example("", data[i])
        return hasher.hexdigest(n)
    raise InfluenceKitError(f"data_fingerprint takes a tuple of tensors, a Dataset or a "
                            f"DataLoader, got {type(data).__name__}.")
