"""Resumable result arrays: rows written one at a time, each with its own checksum.

A results folder holds three files:

- ``values.npy``: the ``[rows, *row_shape]`` array (a plain ``.npy`` file, readable by
  ``numpy.load``); rows not yet written hold whatever was there (zeros, or a row cut short);
- ``checksums.npy``: ``[rows, 16]`` uint8, one record per row: all zeros while the row is not
  done, else the first 16 bytes of sha256(store_id ‖ row index ‖ row bytes). The record is the
  done flag; a row whose record does not match its bytes is corrupt;
- ``meta.json``: shape, dtype, the free-form ``config`` describing what the rows mean, a random
  ``store_id``, the size and a sha256 of each ``.npy`` header, and its own checksum.

Writing a row: the row's bytes are written with ``os.pwrite`` at the row's offset and synced,
THEN its record is written and synced. A process killed at any point leaves the row without a
record (it is computed again on resume) or complete with a matching record; a resumed run
produces the same array as an uninterrupted one.

Two writers (processes, possibly on different machines sharing the folder) on different rows
never touch the same bytes: each writes only its rows' byte ranges of ``values.npy`` and its
rows' 16-byte records of ``checksums.npy`` (records are 16-byte aligned, so never split across
pages), and nobody rewrites a whole file after creation. Writes go through ``pwrite`` rather than
a writable memmap, so no writer flushes a whole page holding another writer's rows from a stale
copy (which a network file system's page write-back could do). The folder is created in a
staging folder beside it and renamed into place, so two processes creating the same store at
once end up sharing one store. A reader verifies every done row against its record, the file
sizes and the ``.npy`` headers; every refusal is a :class:`StoreError` naming the file, what is
wrong and the fix.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from pathlib import Path

import numpy as np

from ..errors import StoreError
from .files import json_roundtrip, read_json, safe_path, write_json
from .records import (
    RECORD_BYTES,
    WriterFiles,
    check_npy,
    create_staged,
    digest,
    new_npy,
    pwrite_all,
    valid_file_record,
)

VALUES = "values.npy"
CHECKSUMS = "checksums.npy"
META = "meta.json"
MEMMAP_FORMAT = 2
_RETRY_SECONDS = 0.05  # a record read while another process writes it is read once more

_DELETE = "delete the folder to compute the results again"


class ResultsArray(WriterFiles):
    """A ``[rows, *row_shape]`` array on disk whose rows are filled one at a time.

    Use :meth:`open` (creates or resumes, verifies), or :meth:`read` (read-only, no expected
    configuration); then :meth:`pending` lists the rows still to compute, :meth:`write` stores
    one row and marks it done, :meth:`values` returns the verified array.
    """

    def __init__(self, folder, meta: dict, writable: bool):
        self.folder = Path(folder)
        self.meta = meta
        self.writable = writable
        self._fds: dict[str, int] = {}

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder, shape: tuple[int, ...], dtype="float64", config: dict | None = None,
             *, discard_corrupt: bool = False) -> ResultsArray:
        """Create the arrays in ``folder``, or reopen them to resume.

        Raises :class:`StoreError` if the folder holds results of another shape, dtype or
        ``config`` (another experiment), or if a file is missing, truncated or modified. With
        ``discard_corrupt=True`` done rows whose bytes do not match their checksum are marked
        not done (with a warning) instead, so that a resumed run computes them again.
        """
        folder = Path(folder)
        expected = _expected_meta(shape, dtype, config)
        if not safe_path(folder, META).exists():
            _create(folder, expected)
        array = cls(folder, _load_meta(folder), writable=True)
        array._check_made_for(expected)
        array._verify(discard_corrupt=discard_corrupt)
        return array

    @classmethod
    def read(cls, folder) -> ResultsArray:
        """Open an existing results folder read-only and verify it (no expected config)."""
        array = cls(folder, _load_meta(Path(folder)), writable=False)
        array._verify()
        return array

    @staticmethod
    def rows_done(folder) -> int:
        """How many rows of the store in ``folder`` are done (0 if there is no store yet),
        without verifying them: for progress reports and monitors, never for results."""
        folder = Path(folder)
        if not safe_path(folder, META).exists():
            return 0
        array = ResultsArray(folder, _load_meta(folder), writable=False)
        return int(array.done().sum())

    @staticmethod
    def read_config(folder) -> dict:
        """The ``config`` recorded in the store in ``folder`` (its manifest is checked; the rows
        are not read)."""
        return _load_meta(Path(folder))["config"]

    # -- what is stored -----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta["shape"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def config(self) -> dict:
        return self.meta["config"]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def done(self) -> np.ndarray:
        """The done-mask ``[rows]`` (bool), read from disk now."""
        return self._read_records().any(axis=1)

    def is_done(self, row: int) -> bool:
        return bool(self.done()[self._check_row(row)])

    def pending(self) -> list[int]:
        """Rows not yet written, in order."""
        return [int(i) for i in np.flatnonzero(~self.done())]

    @property
    def complete(self) -> bool:
        return bool(self.done().all())

    # -- writing ------------------------------------------------------------------------------
    def write(self, row: int, value) -> None:
        """Store one row (shape ``row_shape``), sync it, then mark it done (in that order)."""
        self.write_rows([row], np.asarray(value, dtype=self.dtype)[None])

    def write_rows(self, rows, values) -> None:
        """Store several rows ``values [len(rows), *row_shape]``: all their bytes are written and
        synced before any of their records, so one sync pair serves the whole batch."""
        if not self.writable:
            raise StoreError(f"the results store {self.folder} was opened read-only "
                             "(ResultsArray.read); use ResultsArray.open to write rows.")
        rows = [self._check_row(r) for r in rows]
        values = np.asarray(values, dtype=self.dtype)
        if values.shape != (len(rows), *self.shape[1:]):
            raise StoreError(f"rows written to {self.folder} must have shape "
                             f"{self.shape[1:]} each ({len(rows)} rows: "
                             f"{(len(rows), *self.shape[1:])}), got {values.shape}.")
        values_fd, records_fd = self._fd(VALUES), self._fd(CHECKSUMS)
        overwritten = [r for r in rows
                       if any(os.pread(records_fd, RECORD_BYTES, self._record_offset(r)))]
        for r in overwritten:  # un-done first, so a kill mid-overwrite leaves it pending
            pwrite_all(records_fd, bytes(RECORD_BYTES), self._record_offset(r))
        if overwritten:
            os.fdatasync(records_fd)
        for r, value in zip(rows, values, strict=True):
            pwrite_all(values_fd, np.ascontiguousarray(value).tobytes(), self._value_offset(r))
        os.fdatasync(values_fd)
        for r, value in zip(rows, values, strict=True):
            pwrite_all(records_fd, self._digest(r, np.ascontiguousarray(value).tobytes()),
                        self._record_offset(r))
        os.fdatasync(records_fd)

    # -- reading ------------------------------------------------------------------------------
    def values(self) -> np.ndarray:
        """The whole array, verified against the checksums (rows not done hold zeros).

        Raises :class:`StoreError` naming the rows whose bytes do not match their checksum.
        """
        records, values = self._read_verified()
        values[~records.any(axis=1)] = 0
        return values

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``, verified against their checksums; every one must be done.

        Reads only those rows (for stores too large to read at once). Raises
        :class:`StoreError` naming a row that is not done or does not match its checksum.
        """
        if not 0 <= start <= stop <= self.shape[0]:
            raise StoreError(f"rows {start}:{stop} are outside the store {self.folder}, which "
                             f"has {self.shape[0]} rows.")
        self._check_file(CHECKSUMS)
        self._check_file(VALUES)
        with open(self._path(CHECKSUMS), "rb") as handle:
            handle.seek(self._record_offset(start))
            records = np.frombuffer(handle.read((stop - start) * RECORD_BYTES),
                                    dtype=np.uint8).reshape(stop - start, RECORD_BYTES)
        with open(self._path(VALUES), "rb") as handle:
            handle.seek(self._value_offset(start))
            values = np.frombuffer(handle.read((stop - start) * self.row_bytes),
                                   dtype=self.dtype).reshape(stop - start, *self.shape[1:])
        missing = np.flatnonzero(~records.any(axis=1))
        if missing.size:
            raise StoreError(f"row {start + int(missing[0])} of {self.folder} is not done "
                             f"({missing.size} of rows {start}:{stop} are not); finish writing "
                             "the store first (resume the run that fills it).")
        bad = [start + i for i in range(stop - start)
               if self._digest(start + i, values[i].tobytes()) != records[i].tobytes()]
        if bad:
            raise StoreError(self._corrupt_message(bad))
        return values.copy()

    def read_row(self, row: int) -> np.ndarray:
        """One done row ``row_shape``, verified against its checksum (reads only that row).

        Raises :class:`StoreError` when the row is not done or its bytes do not match.
        """
        row = self._check_row(row)
        for attempt in range(2):  # once more, in case a writer was mid-record
            record, data = self._read_one(row)
            if not any(record):
                raise StoreError(f"row {row} of the results store {self.folder} is not done; "
                                 "compute it first (ResultsArray.pending lists such rows).")
            if self._digest(row, data) == record:
                return np.frombuffer(data, dtype=self.dtype).reshape(self.shape[1:]).copy()
            if not attempt:
                time.sleep(_RETRY_SECONDS)
        raise StoreError(self._corrupt_message([row]))

    # -- internals ----------------------------------------------------------------------------
    def _read_one(self, row: int) -> tuple[bytes, bytes]:
        """The record, then the bytes, of one row (the order a writer's syncs guarantee)."""
        self._check_file(CHECKSUMS)
        self._check_file(VALUES)
        with open(self._path(CHECKSUMS), "rb") as handle:
            record = os.pread(handle.fileno(), RECORD_BYTES, self._record_offset(row))
        with open(self._path(VALUES), "rb") as handle:
            data = os.pread(handle.fileno(), self.row_bytes, self._value_offset(row))
        return record, data

    def _check_row(self, row) -> int:
        if isinstance(row, (bool, np.bool_)) or not isinstance(row, (int, np.integer)):
            raise StoreError(f"a row index must be an integer, got {row!r}")
        if not 0 <= int(row) < self.shape[0]:
            raise StoreError(f"row {int(row)} is outside the store {self.folder}, which has "
                             f"{self.shape[0]} rows (0 to {self.shape[0] - 1}).")
        return int(row)

    def _path(self, name: str) -> Path:
        return safe_path(self.folder, name)

    def _offset(self, name: str) -> int:
        return int(self.meta["files"][name]["offset"])

    def _value_offset(self, row: int) -> int:
        return self._offset(VALUES) + row * self.row_bytes

    def _record_offset(self, row: int) -> int:
        return self._offset(CHECKSUMS) + row * RECORD_BYTES

    def _digest(self, row: int, data: bytes) -> bytes:
        return digest(self.meta["store_id"], (row,), data)

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            try:
                self._fds[name] = os.open(self._path(name), os.O_RDWR)
            except OSError as exc:
                raise StoreError(f"{self._path(name)} cannot be opened for writing ({exc}); "
                                 f"{_DELETE}.") from exc
        return self._fds[name]

    def _check_file(self, name: str) -> None:
        """Size and header of one ``.npy`` file against ``meta.json``."""
        check_npy(self._path(name), self.meta["files"][name], _DELETE)

    def _read_records(self) -> np.ndarray:
        self._check_file(CHECKSUMS)
        with open(self._path(CHECKSUMS), "rb") as handle:
            handle.seek(self._offset(CHECKSUMS))
            data = handle.read(self.shape[0] * RECORD_BYTES)
        return np.frombuffer(data, dtype=np.uint8).reshape(self.shape[0], RECORD_BYTES).copy()

    def _read_values(self) -> np.ndarray:
        self._check_file(VALUES)
        with open(self._path(VALUES), "rb") as handle:
            handle.seek(self._offset(VALUES))
            data = handle.read(self.shape[0] * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape).copy()

    def _bad_rows(self, records: np.ndarray, values: np.ndarray) -> list[int]:
        done = np.flatnonzero(records.any(axis=1))
        return [int(r) for r in done
                if self._digest(r, values[r].tobytes()) != records[r].tobytes()]

    def _read_verified(self) -> tuple[np.ndarray, np.ndarray]:
        """Records then values (in that order: a record is written after its row) and the
        rows that fail; a failing row is read again once, in case a writer was mid-record."""
        records = self._read_records()
        values = self._read_values()
        bad = self._bad_rows(records, values)
        if bad:
            time.sleep(_RETRY_SECONDS)
            records, values = self._read_records(), self._read_values()
            bad = self._bad_rows(records, values)
        if bad:
            raise StoreError(self._corrupt_message(bad))
        return records, values

    def _corrupt_message(self, bad: list[int]) -> str:
        shown = ", ".join(str(r) for r in bad[:10]) + (" ..." if len(bad) > 10 else "")
        return (f"{len(bad)} done row(s) of {self._path(VALUES)} do not match their checksums "
                f"in {self._path(CHECKSUMS)} (rows {shown}): {VALUES}, {CHECKSUMS} or "
                f"{self._path(META)} was modified, "
                f"corrupted or comes from another store. Open it with ResultsArray.open(..., "
                f"discard_corrupt=True) to compute those rows again, or {_DELETE}.")

    def _verify(self, discard_corrupt: bool = False) -> None:
        if not discard_corrupt:
            self._read_verified()
            return
        records, values = self._read_records(), self._read_values()
        bad = self._bad_rows(records, values)
        if bad:
            warnings.warn(self._corrupt_message(bad) + " They are marked not done.",
                          stacklevel=3)
            fd = self._fd(CHECKSUMS)
            for r in bad:
                pwrite_all(fd, bytes(RECORD_BYTES), self._record_offset(r))
            os.fdatasync(fd)

    def _check_made_for(self, expected: dict) -> None:
        for key in ("format", "shape", "dtype"):
            if self.meta[key] != expected[key]:
                raise StoreError(
                    f"the results store {self.folder} was made for another run "
                    f"({self._path(META)}): its {META} says {key} "
                    f"{self.meta[key]!r}, this run needs {expected[key]!r}. Use another folder, "
                    "or delete this one to discard its results.")
        stored, wanted = self.meta["config"], expected["config"]
        if stored != wanted:
            keys = sorted(set(stored) | set(wanted), key=str)
            diff = "; ".join(f"{k}: stored {_short(stored.get(k))}, this run "
                             f"{_short(wanted.get(k))}"
                             for k in keys if stored.get(k) != wanted.get(k))
            raise StoreError(
                f"the results store {self.folder} was made for another run "
                f"({self._path(META)}): the config in its {META} differs ({diff}). Use another "
                "folder, or delete this one to discard its results.")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _expected_meta(shape, dtype, config) -> dict:
    try:
        shape = [int(s) for s in shape]
        dtype = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"a ResultsArray needs a shape of integers and a numpy dtype, got "
                         f"shape={shape!r}, dtype={dtype!r} ({exc}).") from exc
    if not shape or min(shape) < 1 or dtype.hasobject or dtype.itemsize == 0:
        raise StoreError(f"a ResultsArray needs a shape of positive sizes and a plain numeric "
                         f"dtype, got shape={shape}, dtype={dtype}.")
    return {"format": MEMMAP_FORMAT, "shape": shape, "dtype": dtype.str,
            "config": json_roundtrip(config or {})}


def _create(folder: Path, expected: dict) -> None:
    """Build the store in a staging folder beside ``folder`` and rename it into place. If
    another process got there first, keep its store (the caller then opens it)."""
    def build(staging: Path) -> None:
        files = {VALUES: new_npy(safe_path(staging, VALUES), expected["shape"],
                                 expected["dtype"]),
                 CHECKSUMS: new_npy(safe_path(staging, CHECKSUMS),
                                    [expected["shape"][0], RECORD_BYTES], np.uint8)}
        write_json(safe_path(staging, META),
                   {**expected, "store_id": uuid.uuid4().hex, "files": files})

    create_staged(folder, META, build, _DELETE)


def _load_meta(folder: Path) -> dict:
    path = safe_path(folder, META)
    if not path.exists():
        if folder.is_dir() and any(folder.iterdir()):
            raise StoreError(f"{folder} holds files but no {META}: it is not a results store, or "
                             f"{path} was deleted; {_DELETE}.")
        raise StoreError(f"no results store at {folder} (no {META}); create it with "
                         "ResultsArray.open(folder, shape, dtype, config).")
    meta = read_json(path, f"the results store is corrupt: {_DELETE}.")
    if meta.get("format") != MEMMAP_FORMAT:
        raise StoreError(f"{path} has results format {meta.get('format')!r}, this influencekit "
                         f"reads format {MEMMAP_FORMAT}; {_DELETE}.")
    _check_meta_structure(meta, path)
    return meta


def _check_meta_structure(meta: dict, path: Path) -> None:
    """The entries a valid checksum could still carry in a wrong shape (another writer)."""
    def fail(what):
        raise StoreError(f"{path} is not a results manifest of this influencekit ({what}); "
                         f"{_DELETE}.")

    shape = meta.get("shape")
    if not (isinstance(shape, list) and shape and all(type(s) is int and s > 0 for s in shape)):
        fail(f"shape {shape!r}")
    try:
        np.dtype(meta.get("dtype"))
    except TypeError:
        fail(f"dtype {meta.get('dtype')!r}")
    if not isinstance(meta.get("store_id"), str) or not isinstance(meta.get("config"), dict):
        fail("store_id or config")
    files = meta.get("files")
    for name in (VALUES, CHECKSUMS):
        if not valid_file_record(files.get(name) if isinstance(files, dict) else None):
            fail(f"the entry for {name}")
