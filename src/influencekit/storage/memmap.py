"""Resumable result arrays: an ``.npy`` memmap of rows beside a per-row done-mask.

A results folder holds ``values.npy`` (``[rows, *row_shape]``), ``done.npy`` (``[rows]`` bool)
and ``meta.json`` (shape, dtype and a free-form ``config`` describing what the rows mean). A row
is written and flushed before its done flag is set, so a run killed at any point resumes at the
first row that is not done and produces the same array as an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import StoreError

VALUES = "values.npy"
DONE = "done.npy"
META = "meta.json"
MEMMAP_FORMAT = 1


class ResultsArray:
    """A ``[rows, *row_shape]`` array on disk whose rows are filled one at a time.

    Use :meth:`open` (creates or resumes); then :meth:`pending` lists the rows still to compute,
    :meth:`write` stores one row and marks it done, :meth:`values` returns the array (a
    read-only ``numpy`` memmap).
    """

    def __init__(self, folder: Path, values: np.memmap, done: np.memmap, meta: dict):
        self.folder = folder
        self._values = values
        self._done = done
        self.meta = meta

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder, shape: tuple[int, ...], dtype="float64",
             config: dict | None = None) -> ResultsArray:
        """Create the arrays in ``folder``, or reopen them to resume.

        Raises :class:`StoreError` if the folder holds results of another shape, dtype or
        ``config`` (another experiment), or if its files are unreadable or truncated.
        """
        folder = Path(folder)
        shape = tuple(int(s) for s in shape)
        meta = {"format": MEMMAP_FORMAT, "shape": list(shape), "dtype": np.dtype(dtype).str,
                "config": _jsonable(config or {})}
        if (folder / META).exists():
            return cls._reopen(folder, meta)
        folder.mkdir(parents=True, exist_ok=True)
        values = np.lib.format.open_memmap(folder / VALUES, mode="w+", dtype=dtype, shape=shape)
        done = np.lib.format.open_memmap(folder / DONE, mode="w+", dtype=bool, shape=shape[:1])
        values.flush()
        done.flush()
        # meta.json last: a folder without it is treated as not yet created.
        (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return cls(folder, values, done, meta)

    @classmethod
    def _reopen(cls, folder: Path, meta: dict) -> ResultsArray:
        try:
            stored = json.loads((folder / META).read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{folder / META} is not valid JSON ({exc}); the results store is "
                             "corrupt: delete the folder to start again.") from exc
        for key in ("format", "shape", "dtype", "config"):
            if stored.get(key) != meta[key]:
                raise StoreError(
                    f"the results store {folder} was made for another run: its {key} is "
                    f"{stored.get(key)!r}, this run needs {meta[key]!r}. Use another folder, or "
                    "delete this one to discard its results.")
        try:
            values = np.lib.format.open_memmap(folder / VALUES, mode="r+")
            done = np.lib.format.open_memmap(folder / DONE, mode="r+")
        except (OSError, ValueError) as exc:
            raise StoreError(f"the results files in {folder} cannot be read ({exc}); they are "
                             "truncated or corrupt: delete the folder to start again.") from exc
        if (values.shape != tuple(meta["shape"]) or values.dtype.str != meta["dtype"]
                or done.shape != tuple(meta["shape"][:1]) or done.dtype != bool):
            raise StoreError(f"the results files in {folder} do not match {META} (values "
                             f"{values.shape} {values.dtype}, done {done.shape}); the store is "
                             "corrupt: delete the folder to start again.")
        return cls(folder, values, done, stored)

    # -- rows ---------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._values.shape)

    def is_done(self, row: int) -> bool:
        return bool(self._done[row])

    def pending(self) -> list[int]:
        """Rows not yet written, in order."""
        return [int(i) for i in np.flatnonzero(~np.asarray(self._done))]

    @property
    def complete(self) -> bool:
        return bool(np.asarray(self._done).all())

    def write(self, row: int, value) -> None:
        """Store one row, flush it, then mark it done (in that order)."""
        value = np.asarray(value, dtype=self._values.dtype)
        if value.shape != self.shape[1:]:
            raise ValueError(f"row {row} must have shape {self.shape[1:]}, got {value.shape}")
        self._values[row] = value
        self._values.flush()
        self._done[row] = True
        self._done.flush()

    def values(self) -> np.ndarray:
        """The whole array (rows not done hold zeros)."""
        return np.asarray(self._values)

    def done(self) -> np.ndarray:
        """The done-mask ``[rows]``."""
        return np.asarray(self._done).copy()


def _jsonable(value):
    """Round-trip through JSON so that tuples/lists compare equal after reopening."""
    return json.loads(json.dumps(value, sort_keys=True))
