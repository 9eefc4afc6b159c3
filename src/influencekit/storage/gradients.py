"""Gradient stores: projected per-example training gradients on disk, written once, reused.

A gradient store is a :class:`~influencekit.storage.ResultsArray` (``values.npy`` with one row
per training example, a checksum per row that doubles as its done flag, and a checksummed
``meta.json``) whose ``config`` records what the rows are: the projection, the layout of a row
(layers and their projected shapes), the Target's parameters, whether ∇R is included, the dtype,
and the model and data fingerprints. Reopening a folder with another configuration is refused
with a :class:`StoreError` naming the keys that differ, so rows of two runs never mix; a run
killed while writing resumes at the rows not yet done.

Computing the rows is not done here (this package only touches files): see
:func:`influencekit.scoring.build_gradient_store`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import StoreError
from .memmap import META, ResultsArray, _load_meta

GRADIENTS = "gradients"
GRADIENT_STORE_KIND = "influencekit.gradient_store.v1"
DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


class GradientStore:
    """Projected training gradients ``[n_train, k]`` in ``folder`` (see the module docstring).

    Use :meth:`open` to create or resume (with the expected ``config``) and :meth:`load` to read
    a finished store. Rows are tensors of the store's dtype.
    """

    def __init__(self, folder: Path, array: ResultsArray):
        self.folder = Path(folder)
        self.array = array

    @classmethod
    def open(cls, folder, n_train: int, width: int, config: dict,
             dtype: str = "float32") -> GradientStore:
        """Create the store, or reopen it to resume; refuses a store of another configuration
        (the message names the keys that differ)."""
        if dtype not in DTYPES:
            raise StoreError(f"gradient store dtype {dtype!r} is not one of {sorted(DTYPES)}")
        full = {"kind": GRADIENT_STORE_KIND, **config}
        array = ResultsArray.open(Path(folder) / GRADIENTS, (int(n_train), int(width)),
                                  DTYPES[dtype], full)
        return cls(folder, array)

    @classmethod
    def load(cls, folder) -> GradientStore:
        """Open an existing store read-only (verifies files and headers; rows are verified as
        they are read)."""
        path = Path(folder) / GRADIENTS
        if not (path / META).exists():
            raise StoreError(f"no gradient store at {folder} ({GRADIENTS}/{META} is missing); "
                             "build it with influencekit.scoring.build_gradient_store.")
        array = ResultsArray(path, _load_meta(path), writable=False)
        if array.config.get("kind") != GRADIENT_STORE_KIND:
            raise StoreError(f"{path} is a results store but not a gradient store (its config "
                             f"kind is {array.config.get('kind')!r}).")
        return cls(folder, array)

    # -- what is stored -----------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return self.array.config

    @property
    def n_train(self) -> int:
        return self.array.shape[0]

    @property
    def width(self) -> int:
        """k: numbers per row (projected gradient of one training example)."""
        return self.array.shape[1]

    @property
    def complete(self) -> bool:
        return self.array.complete

    def pending(self) -> list[int]:
        """Rows not written yet, in order."""
        return self.array.pending()

    def check_same(self, **expected) -> None:
        """Raise :class:`StoreError` unless the store's config has these values (e.g.
        ``model_fingerprint=...``), naming every key that differs."""
        diff = [f"{k}: stored {_short(self.config.get(k))}, expected {_short(v)}"
                for k, v in expected.items() if self.config.get(k) != v]
        if diff:
            raise StoreError(f"the gradient store {self.folder} was made for another run "
                             f"({'; '.join(diff)}). Build a store for this model and projection "
                             "in another folder.")

    # -- rows ---------------------------------------------------------------------------------
    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        """Store rows ``start : start + len(rows)`` and mark them done (synced first)."""
        values = rows.detach().to("cpu").numpy().astype(self.array.dtype, copy=False)
        self.array.write_rows(list(range(start, start + values.shape[0])), values)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """``[stop - start, k]`` verified rows (all must be done)."""
        return torch.from_numpy(self.array.rows(start, stop))

    def iter_blocks(self, block_size: int = 1024):
        """Yield ``(start, rows [b, k])`` over the whole store, verified block by block."""
        if not self.complete:
            raise StoreError(f"the gradient store {self.folder} is not complete "
                             f"({len(self.pending())} rows missing); resume "
                             "build_gradient_store with the same arguments first.")
        for start in range(0, self.n_train, block_size):
            yield start, self.rows(start, min(start + block_size, self.n_train))

    def close(self) -> None:
        self.array.close()


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
