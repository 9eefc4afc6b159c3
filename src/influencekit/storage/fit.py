"""Fit stores: a fit's statistics written chunk by chunk, so that a killed fit resumes.

A fit store is a folder holding one :class:`~influencekit.storage.ResultsArray` per pass over
the training data (``factors/`` and ``corrections/`` for EK-FAC, ``dense/`` for a dense
curvature). Row ``c`` of a pass holds that pass's sums over chunk ``c`` of the training data
(float64, flattened), then their summed example weight and their number of examples. Each row is
checksummed and written durably before it is marked done (see ``ResultsArray``), so a process
killed at any point leaves whole chunks or nothing; a resumed fit computes only the chunks not
done and adds every chunk in chunk order — the same additions in the same order as an
uninterrupted fit, so the same bits.

Each pass records what it was computed from in its ``config``: the statistic and the settings
it depends on, the model fingerprint, the data fingerprint, the weights, the dtype, the batch
size and the chunking. Reopening it for a fit that differs in any of these raises
:class:`~influencekit.errors.StoreError` naming the key (delete the folder, or use another).

Chunks are whole batches of the data's batch grid (batches start at multiples of the batch
size), so a chunk's sums do not depend on which process computed it; several processes of one
run (``torchrun``) write disjoint chunks of one store. Disk: ``n_chunks`` rows of the size of
the statistics (for K-FAC, Σ over layers of ``d_in² + d_out²`` float64 numbers).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import StoreError
from .files import safe_path
from .memmap import META, ResultsArray

DEFAULT_CHUNKS = 16
"""Chunks a pass is cut into when ``chunk_size`` is not given (at least 4 per process)."""


class FitStore:
    """Where a fit writes its statistics, one row per chunk of the training data.

    Args:
        folder: the store's folder (created when missing; reopened to resume).
        chunk_size: examples per chunk, rounded up to whole batches; a kill loses at most one
            chunk of work per process. Default: what the store already uses, else the data cut
            into ``max(16, 4 × processes)`` chunks.

    Pass it (or just a folder) as ``store=`` to ``KFAC.fit`` / ``EKFAC.fit`` / ``Exact.fit``.
    """

    def __init__(self, folder: str | os.PathLike, chunk_size: int | None = None):
        self.folder = Path(folder)
        self.chunk_size = chunk_size

    @classmethod
    def of(cls, store) -> FitStore | None:
        """``store`` as a FitStore (a folder becomes one with the default chunking)."""
        if store is None or isinstance(store, FitStore):
            return store
        if isinstance(store, (str, os.PathLike)):
            return cls(store)
        raise StoreError(f"store= must be a folder or an ik.storage.FitStore, got "
                         f"{type(store).__name__}.")

    def chunk_batches(self, name: str, batch_size: int, n_batches: int, processes: int) -> int:
        """Batches per chunk of pass ``name``: from ``chunk_size``, else from the pass already
        on disk, else the default."""
        if self.chunk_size is not None:
            if int(self.chunk_size) < 1:
                raise StoreError(f"chunk_size must be a positive number of examples, got "
                                 f"{self.chunk_size}.")
            return max(1, math.ceil(int(self.chunk_size) / batch_size))
        stored = self._stored_config(name)
        if stored is not None and isinstance(stored.get("chunk_batches"), int):
            return stored["chunk_batches"]
        chunks = max(DEFAULT_CHUNKS, 4 * processes)
        return max(1, math.ceil(n_batches / chunks))

    def pass_array(self, name: str, n_chunks: int, row_length: int,
                   config: dict) -> ResultsArray:
        """The results array of pass ``name``: ``[n_chunks, row_length]`` float64, created or
        reopened (refused when it was made for another fit)."""
        return ResultsArray.open(self.folder / name, (n_chunks, row_length), "float64", config)

    def _stored_config(self, name: str) -> dict | None:
        folder = self.folder / name
        if not safe_path(folder, META).exists():
            return None
        return ResultsArray.read_config(folder)

    def __repr__(self) -> str:
        return f"FitStore({str(self.folder)!r}, chunk_size={self.chunk_size})"
