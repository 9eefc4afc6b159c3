"""Score stores: a ``[n_query, n_train]`` score matrix on disk, written block by block.

A store is a folder holding

- ``scores.npy``: the scores of the training examples ``columns`` (all of them, or one
  partition's contiguous share), ``[n_query, len(columns)]``, a plain ``.npy`` file
  (bfloat16 is kept as its raw 16-bit pattern, dtype ``uint16`` in numpy);
- ``checksums.npy``: ``[n_query_blocks, n_train_blocks, 16]`` uint8, one record per block of
  the grid ``block_shape`` (blocks start at the store's first row and column): all zeros while
  the block is not done, else ``sha256(store_id ‖ qi ‖ ti ‖ the block's bytes)[:16]``. The
  record is the done flag; a block whose bytes do not match it is corrupt;
- ``manifest.json``: the run that made it — format, full shape, columns, partition, block
  shape, dtype, model fingerprint, data fingerprints and a free-form ``config`` (inverse, task,
  dtypes) — plus a random ``store_id`` and the exact size and header sha256 of both ``.npy``
  files, with its own checksum (:mod:`influencekit.storage.files`).

The guarantees are those of :class:`~influencekit.storage.ResultsArray`, from the same pieces
(:mod:`influencekit.storage.records`): the folder is built in a staging folder and renamed into
place; scores are written with ``os.pwrite`` (never a writable memmap), so writers of different
blocks (the ranks of a distributed run) touch disjoint byte ranges; every read verifies the
manifest's checksum, both files' sizes and headers, and each done block's record, and every
refusal is a :class:`~influencekit.errors.StoreError` naming the file, the block and the fix.

Blocks are committed in groups: written blocks are synced to disk BEFORE their records are
written and synced, at most every ``commit_seconds`` (and at :meth:`ScoreStore.commit`). So a
process killed at any point, or a machine that goes down, leaves only whole blocks marked done
(a kill loses at most the last ``commit_seconds`` of work); reopening the store with the same
manifest resumes, and reopening it with a different one raises :class:`StoreError` naming the
field that differs.
Scores follow the conventions table (``s = g_qᵀ (C + λI)⁻¹ g_m``, no 1/n).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..distributed import Partition
from ..errors import StoreError
from .files import read_json, safe_path, write_json
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

SCORES = "scores.npy"
CHECKSUMS = "checksums.npy"
MANIFEST = "manifest.json"
SCORE_STORE_FORMAT = 2
STORE_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
_NUMPY = {"float64": np.float64, "float32": np.float32, "bfloat16": np.uint16}
_LAYOUT = ("store_id", "files")  # manifest entries that describe the files, not the run
_DELETE = "delete the folder to compute the scores again"
_RETRY_SECONDS = 0.05  # a record read while another process writes it is read once more


class ScoreStore(WriterFiles):
    """A ``[n_query, n_train]`` score matrix (or one partition's columns of it) on disk.

    Open with :meth:`open` (create or resume) or :meth:`load` (an existing store). Blocks are
    addressed by their grid position ``(qi, ti)``: rows ``qi * block_shape[0] ...`` and columns
    ``columns.start + ti * block_shape[1] ...`` of the full matrix. ``manifest`` is the run's
    description (without the store's file layout).
    """

    def __init__(self, folder: Path, manifest: dict, layout: dict, writable: bool,
                 commit_seconds: float = 1.0):
        self.folder = Path(folder)
        self.manifest = manifest
        self.layout = layout
        self.writable = writable
        self.commit_seconds = commit_seconds
        self._pending: dict[tuple[int, int], bytes] = {}  # block -> its record, not yet on disk
        self._last_commit = time.monotonic()
        self._fds: dict[str, int] = {}
        self._records = np.load(self._path(CHECKSUMS), mmap_mode="r")
        self._scores = np.load(self._path(SCORES), mmap_mode="r")

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder, *, n_query: int, n_train: int, block_shape: tuple[int, int],
             dtype: str = "float32", config: dict | None = None,
             model_fingerprint: str = "", data_fingerprints: dict | None = None,
             partition: Partition | str | None = None,
             commit_seconds: float = 1.0) -> ScoreStore:
        """Create the store in ``folder``, or reopen it to resume the same run.

        ``partition`` (e.g. ``"3/8"``) makes a partial store of that partition's training
        examples; ``commit_seconds``: how often written blocks are made durable and marked done
        (0: after every block). Raises :class:`StoreError` when the folder holds a store of
        another run (the message names the first field that differs) or is corrupt.
        """
        manifest = build_manifest(n_query=n_query, n_train=n_train, block_shape=block_shape,
                                  dtype=dtype, config=config or {},
                                  model_fingerprint=model_fingerprint,
                                  data_fingerprints=data_fingerprints or {},
                                  partition=Partition.parse(partition))
        folder = Path(folder)
        if not safe_path(folder, MANIFEST).exists():
            _create(folder, manifest)
        store = cls.load(folder)
        store.check_same_run(manifest)
        store.commit_seconds = commit_seconds
        return store

    @classmethod
    def load(cls, folder, writable: bool = True) -> ScoreStore:
        """Open an existing store (``writable=False``: read only). Verifies the manifest's
        checksum and both files' sizes and headers; blocks are verified when read."""
        folder = Path(folder)
        manifest, layout = _load_manifest(folder)
        for name in (SCORES, CHECKSUMS):
            check_npy(safe_path(folder, name), layout["files"][name], _DELETE)
        return cls(folder, manifest, layout, writable)

    @staticmethod
    def blocks_done(folder) -> int:
        """How many blocks of the store in ``folder`` are done (0 if there is no store yet),
        without verifying them: for progress reports and monitors, never for results."""
        folder = Path(folder)
        if not safe_path(folder, MANIFEST).exists():
            return 0
        return int(ScoreStore.load(folder, writable=False).done().sum())

    def check_same_run(self, manifest: dict) -> None:
        """Raise :class:`StoreError` naming the first field where ``manifest`` differs."""
        path = first_difference(self.manifest, manifest)
        if path is None:
            return
        stored, wanted = _lookup(self.manifest, path), _lookup(manifest, path)
        raise StoreError(
            f"the score store {self.folder} was made by another run (see its {MANIFEST}): its "
            f"{'.'.join(path)} is "
            f"{_short(stored)}, this run has {_short(wanted)}{_hint(path)}. Use another folder, "
            "or delete this one to discard its scores.")

    # -- layout -------------------------------------------------------------------------------
    @property
    def n_query(self) -> int:
        return self.manifest["shape"][0]

    @property
    def n_train(self) -> int:
        """Training examples of the whole run (not only this store's columns)."""
        return self.manifest["shape"][1]

    @property
    def columns(self) -> range:
        """The training examples whose scores this store holds."""
        return range(*self.manifest["columns"])

    @property
    def partition(self) -> Partition:
        return Partition.parse(self.manifest["partition"])

    @property
    def block_shape(self) -> tuple[int, int]:
        return tuple(self.manifest["block_shape"])

    @property
    def grid(self) -> tuple[int, int]:
        """``(n_query_blocks, n_train_blocks)``."""
        return _grid(self.manifest)

    @property
    def dtype(self) -> torch.dtype:
        return STORE_DTYPES[self.manifest["dtype"]]

    def block_rows(self, qi: int) -> range:
        """Query rows of block row ``qi``."""
        bq = self.block_shape[0]
        return range(qi * bq, min((qi + 1) * bq, self.n_query))

    def block_columns(self, ti: int) -> range:
        """Training examples (global indices) of block column ``ti``."""
        bt, start = self.block_shape[1], self.columns.start
        return range(start + ti * bt, min(start + (ti + 1) * bt, self.columns.stop))

    # -- blocks -------------------------------------------------------------------------------
    def is_done(self, qi: int, ti: int) -> bool:
        """Block ``(qi, ti)`` is on disk, or written by this process and not yet committed."""
        qi, ti = self._check_block(qi, ti)
        return (qi, ti) in self._pending or bool(self._records[qi, ti].any())

    def done(self) -> np.ndarray:
        """The done-mask ``[n_query_blocks, n_train_blocks]`` (a copy, read from disk now;
        includes blocks written by this process and not yet committed)."""
        mask = np.asarray(self._records).any(axis=2)
        for qi, ti in self._pending:
            mask[qi, ti] = True
        return mask

    @property
    def complete(self) -> bool:
        return bool(self.done().all())

    def commit(self) -> None:
        """Sync the blocks written since the last commit, then write and sync their records."""
        if self._pending:
            os.fdatasync(self._fd(SCORES))
            records = self._fd(CHECKSUMS)
            for (qi, ti), record in sorted(self._pending.items()):
                pwrite_all(records, record, self._record_offset(qi, ti))
            os.fdatasync(records)
            self._pending.clear()
        self._last_commit = time.monotonic()

    def write_block(self, qi: int, ti: int, scores: torch.Tensor | np.ndarray) -> None:
        """Store block ``(qi, ti)`` (rounded to the store's dtype); it is marked done at the
        next commit (automatic after ``commit_seconds``; call :meth:`commit` when finished).
        A block already done is first marked not done, so a kill mid-overwrite leaves it to be
        computed again."""
        qi, ti = self._check_block(qi, ti)
        rows, cols = self.block_rows(qi), self.block_columns(ti)
        scores = torch.as_tensor(scores)
        if tuple(scores.shape) != (len(rows), len(cols)):
            raise StoreError(f"block ({qi}, {ti}) of {self.folder} has shape "
                             f"({len(rows)}, {len(cols)}), got {tuple(scores.shape)}.")
        if self._records[qi, ti].any():
            self._write_record(qi, ti, bytes(RECORD_BYTES))
        data = np.ascontiguousarray(_encode(scores, self.manifest["dtype"]))
        fd = self._fd(SCORES)
        offset = self._score_offset(rows.start, cols.start)
        stride = len(self.columns) * self._itemsize
        if len(cols) == len(self.columns):  # whole rows: one contiguous write
            pwrite_all(fd, data.tobytes(), offset)
        else:
            for i, row in enumerate(data):
                pwrite_all(fd, row.tobytes(), offset + i * stride)
        self._pending[(qi, ti)] = self._digest(qi, ti, data.tobytes())
        if time.monotonic() - self._last_commit >= self.commit_seconds:
            self.commit()

    def discard_block(self, qi: int, ti: int) -> None:
        """Mark block ``(qi, ti)`` not done: the next run recomputes it."""
        qi, ti = self._check_block(qi, ti)
        self._pending.pop((qi, ti), None)
        self._write_record(qi, ti, bytes(RECORD_BYTES))

    def read_block(self, qi: int, ti: int) -> torch.Tensor:
        """Block ``(qi, ti)`` as a tensor of the store's dtype (zeros where not done),
        verified against its record."""
        rows, cols = self.block_rows(qi), self.block_columns(ti)
        return self.read(rows, cols)

    def read(self, rows: range | None = None, cols: range | None = None) -> torch.Tensor:
        """Scores of query ``rows`` × training examples ``cols`` (global indices, within this
        store's columns; default all), as a tensor of the store's dtype. Every done block they
        touch is verified against its record (:class:`StoreError` naming the blocks that do
        not match); blocks not done read as zeros."""
        rows = range(self.n_query) if rows is None else rows
        cols = self.columns if cols is None else cols
        if cols.start < self.columns.start or cols.stop > self.columns.stop:
            raise StoreError(f"columns {cols.start}..{cols.stop - 1} are outside this store's "
                             f"training examples {self.columns.start}..{self.columns.stop - 1}.")
        if rows.start < 0 or rows.stop > self.n_query:
            raise StoreError(f"rows {rows.start}..{rows.stop - 1} are outside this store's "
                             f"{self.n_query} queries.")
        values = self._read_verified(rows, cols)
        return _decode(values, self.manifest["dtype"])

    def scores(self) -> torch.Tensor:
        """The whole ``[n_query, len(columns)]`` matrix in memory (the store's dtype),
        verified."""
        return self.read()

    def raw(self) -> np.memmap:
        """The memmapped score array itself, read only and NOT verified (bfloat16 as
        ``uint16`` bit patterns): for fast inspection; :meth:`read` verifies."""
        return self._scores

    def verify(self, discard_corrupt: bool = False) -> list[tuple[int, int]]:
        """Check every done block against its record; returns the corrupt blocks. Raises
        :class:`StoreError` naming them, or with ``discard_corrupt=True`` marks them not done
        (with a warning) so that a resumed run computes them again."""
        bad = self._bad_blocks(range(self.grid[0]), range(self.grid[1]))
        if bad and not discard_corrupt:
            raise StoreError(self._corrupt_message(bad))
        if bad:
            warnings.warn(self._corrupt_message(bad) + " They are marked not done.",
                          stacklevel=2)
            for qi, ti in bad:
                self.discard_block(qi, ti)
        return bad

    # -- internals ----------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return safe_path(self.folder, name)

    def _check_block(self, qi, ti) -> tuple[int, int]:
        n_qb, n_tb = self.grid
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
                 for v in (qi, ti))
        if not ok or not (0 <= int(qi) < n_qb and 0 <= int(ti) < n_tb):
            raise StoreError(f"block ({qi!r}, {ti!r}) is outside the grid of {self.folder}, "
                             f"which has {n_qb} x {n_tb} blocks.")
        return int(qi), int(ti)

    def _fd(self, name: str) -> int:
        if not self.writable:
            raise StoreError(f"the score store {self.folder} was opened read-only "
                             "(ScoreStore.load(..., writable=False)); open it writable to write.")
        if name not in self._fds:
            try:
                self._fds[name] = os.open(self._path(name), os.O_RDWR)
            except OSError as exc:
                raise StoreError(f"{self._path(name)} cannot be opened for writing ({exc}); "
                                 f"{_DELETE}.") from exc
        return self._fds[name]

    @property
    def _itemsize(self) -> int:
        return np.dtype(_NUMPY[self.manifest["dtype"]]).itemsize

    def _score_offset(self, row: int, column: int) -> int:
        width = len(self.columns)
        local = column - self.columns.start
        return self.layout["files"][SCORES]["offset"] + (row * width + local) * self._itemsize

    def _record_offset(self, qi: int, ti: int) -> int:
        return (self.layout["files"][CHECKSUMS]["offset"]
                + (qi * self.grid[1] + ti) * RECORD_BYTES)

    def _write_record(self, qi: int, ti: int, record: bytes) -> None:
        fd = self._fd(CHECKSUMS)
        pwrite_all(fd, record, self._record_offset(qi, ti))
        os.fdatasync(fd)

    def _digest(self, qi: int, ti: int, data: bytes) -> bytes:
        return digest(self.layout["store_id"], (qi, ti), data)

    def _block_bytes(self, qi: int, ti: int) -> bytes:
        rows, cols = self.block_rows(qi), self.block_columns(ti)
        local = slice(cols.start - self.columns.start, cols.stop - self.columns.start)
        return np.ascontiguousarray(self._scores[rows.start:rows.stop, local]).tobytes()

    def _blocks_of(self, rows: range, cols: range) -> tuple[range, range]:
        bq, bt = self.block_shape
        start = self.columns.start
        if len(rows) == 0 or len(cols) == 0:
            return range(0), range(0)
        return (range(rows.start // bq, (rows.stop - 1) // bq + 1),
                range((cols.start - start) // bt, (cols.stop - 1 - start) // bt + 1))

    def _bad_blocks(self, qis: range, tis: range) -> list[tuple[int, int]]:
        bad = []
        for qi in qis:
            for ti in tis:
                record = bytes(self._records[qi, ti])
                if any(record) and self._digest(qi, ti, self._block_bytes(qi, ti)) != record:
                    bad.append((qi, ti))
        return bad

    def _read_verified(self, rows: range, cols: range) -> np.ndarray:
        """Records, then values (a record is written after its block), verified; a failing
        block is read again once, in case another process was writing it."""
        for name in (SCORES, CHECKSUMS):
            check_npy(self._path(name), self.layout["files"][name], _DELETE)
        qis, tis = self._blocks_of(rows, cols)
        bad = self._bad_blocks(qis, tis)
        if bad:
            time.sleep(_RETRY_SECONDS)
            bad = self._bad_blocks(qis, tis)
        if bad:
            raise StoreError(self._corrupt_message(bad))
        local = slice(cols.start - self.columns.start, cols.stop - self.columns.start)
        values = np.array(self._scores[rows.start:rows.stop, local])
        for qi in qis:
            for ti in tis:
                if not self.is_done(qi, ti):
                    r, c = self.block_rows(qi), self.block_columns(ti)
                    values[max(r.start - rows.start, 0):max(r.stop - rows.start, 0),
                           max(c.start - cols.start, 0):max(c.stop - cols.start, 0)] = 0
        return values

    def _corrupt_message(self, bad: list[tuple[int, int]]) -> str:
        shown = ", ".join(str(b) for b in bad[:10]) + (" ..." if len(bad) > 10 else "")
        return (f"{len(bad)} done block(s) of {self._path(SCORES)} do not match their checksums "
                f"in {CHECKSUMS} (blocks {shown}): {SCORES}, {CHECKSUMS} or {MANIFEST} was "
                "modified, corrupted or comes from another store. Call "
                "ScoreStore.load(folder).verify(discard_corrupt=True) to compute those blocks "
                f"again, or {_DELETE}.")


def _create(folder: Path, manifest: dict) -> None:
    """Build a store of ``manifest`` in a staging folder and rename it to ``folder`` (another
    process that got there first keeps its store)."""
    def build(staging: Path) -> None:
        n_query, (start, stop) = manifest["shape"][0], manifest["columns"]
        files = {SCORES: new_npy(safe_path(staging, SCORES), (n_query, stop - start),
                                 _NUMPY[manifest["dtype"]]),
                 CHECKSUMS: new_npy(safe_path(staging, CHECKSUMS),
                                    (*_grid(manifest), RECORD_BYTES), np.uint8)}
        write_json(safe_path(staging, MANIFEST),
                   {**manifest, "store_id": uuid.uuid4().hex, "files": files})

    create_staged(folder, MANIFEST, build, _DELETE)


def _load_manifest(folder: Path) -> tuple[dict, dict]:
    """``(run manifest, file layout)`` from ``manifest.json``, checksum and structure checked."""
    path = safe_path(folder, MANIFEST)
    if not path.exists():
        if folder.is_dir() and any(folder.iterdir()):
            raise StoreError(f"{folder} holds files but no {MANIFEST}: it is not a score store, "
                             f"or its {MANIFEST} was deleted; {_DELETE}.")
        raise StoreError(f"no score store at {folder}: {MANIFEST} is missing. Run the "
                         "scoring with store= this folder first.")
    stored = read_json(path, f"the score store is corrupt: {_DELETE}.")
    if stored.get("kind") != "scores" or stored.get("format") != SCORE_STORE_FORMAT:
        raise StoreError(f"{folder} is not a score store of format {SCORE_STORE_FORMAT} "
                         f"(kind {stored.get('kind')!r}, format {stored.get('format')!r}); "
                         f"{_DELETE}.")
    layout = {key: stored.pop(key, None) for key in _LAYOUT}
    _check_structure(stored, layout, path)
    return stored, layout


def _check_structure(manifest: dict, layout: dict, path: Path) -> None:
    """The entries a valid checksum could still carry in a wrong shape (another writer)."""
    def fail(what):
        raise StoreError(f"{path} is not a score-store manifest of this influencekit ({what}); "
                         f"{_DELETE}.")

    def ints(value, n):
        return (isinstance(value, list) and len(value) == n
                and all(type(v) is int and v >= 0 for v in value))

    if not (ints(manifest.get("shape"), 2) and min(manifest["shape"]) > 0):
        fail(f"shape {manifest.get('shape')!r}")
    if not (ints(manifest.get("block_shape"), 2) and min(manifest["block_shape"]) > 0):
        fail(f"block_shape {manifest.get('block_shape')!r}")
    columns = manifest.get("columns")
    if not (ints(columns, 2) and columns[0] < columns[1] <= manifest["shape"][1]):
        fail(f"columns {columns!r}")
    if manifest.get("dtype") not in STORE_DTYPES:
        fail(f"dtype {manifest.get('dtype')!r}")
    if not isinstance(layout["store_id"], str):
        fail("store_id")
    files = layout["files"]
    for name in (SCORES, CHECKSUMS):
        if not valid_file_record(files.get(name) if isinstance(files, dict) else None):
            fail(f"the entry for {name}")


def build_manifest(*, n_query: int, n_train: int, block_shape: Sequence[int], dtype: str,
                   config: dict, model_fingerprint: str, data_fingerprints: dict,
                   partition: Partition) -> dict:
    """The manifest that identifies one scoring run (see the module doc)."""
    if dtype not in STORE_DTYPES:
        raise StoreError(f"score store dtype {dtype!r} is not one of {sorted(STORE_DTYPES)}.")
    if n_query < 1 or n_train < 1:
        raise StoreError(f"a score store needs at least one query and one training example, got "
                         f"n_query={n_query}, n_train={n_train}.")
    block_shape = [int(b) for b in block_shape]
    if len(block_shape) != 2 or min(block_shape) < 1:
        raise StoreError(f"block_shape must be two positive sizes, got {block_shape}.")
    columns = partition.range(n_train)
    if len(columns) == 0:
        raise StoreError(f"partition {partition} of {n_train} training examples is empty; use "
                         f"at most {n_train} partitions.")
    return _jsonable({
        "kind": "scores", "format": SCORE_STORE_FORMAT,
        "model_fingerprint": model_fingerprint, "data_fingerprints": data_fingerprints,
        "config": config, "shape": [n_query, n_train], "dtype": dtype,
        "block_shape": block_shape, "partition": None if partition.is_whole else str(partition),
        "columns": [columns.start, columns.stop],
    })


# -- partitions -------------------------------------------------------------------------------
def merge_score_stores(parts: Sequence, folder) -> ScoreStore:
    """Combine the complete partial stores of one partitioned run into one store in ``folder``.

    Refuses (:class:`StoreError`) stores of different runs (naming the field that differs), a
    partition given twice, missing partitions, and incomplete partial stores. The merged store
    has the parts' manifest without a partition and the same bits as an unpartitioned run.
    Merging again into the same folder resumes (blocks already copied are skipped).
    """
    stores = [ScoreStore.load(p, writable=False) for p in parts]
    if not stores:
        raise StoreError("merge_score_stores got no partial store to merge.")
    first = stores[0]
    _check_partitions(stores)
    for store in stores[1:]:
        shared = _without_partition(store.manifest)
        path = first_difference(_without_partition(first.manifest), shared)
        if path is not None:
            raise StoreError(
                f"{store.folder} and {first.folder} belong to different runs (their "
                f"{MANIFEST} files differ): their "
                f"{'.'.join(path)} is {_short(_lookup(store.manifest, path))} vs "
                f"{_short(_lookup(first.manifest, path))}{_hint(path)}; merge only the "
                "partitions of one run.")
    for store in stores:
        if not store.complete:
            done = int(store.done().sum())
            raise StoreError(f"partition {store.partition} in {store.folder} is incomplete "
                             f"({done} of {store.done().size} blocks done); resume it before "
                             "merging.")
    m = first.manifest
    merged = ScoreStore.open(folder, n_query=m["shape"][0], n_train=m["shape"][1],
                             block_shape=m["block_shape"], dtype=m["dtype"], config=m["config"],
                             model_fingerprint=m["model_fingerprint"],
                             data_fingerprints=m["data_fingerprints"])
    by_start = sorted(stores, key=lambda s: s.columns.start)
    for qi in range(merged.grid[0]):
        for ti in range(merged.grid[1]):
            if merged.is_done(qi, ti):
                continue
            rows, cols = merged.block_rows(qi), merged.block_columns(ti)
            merged.write_block(qi, ti, _read_across(by_start, rows, cols))
    merged.commit()
    return merged


def _check_partitions(stores: list[ScoreStore]) -> None:
    seen: dict[int, ScoreStore] = {}
    counts = {s.partition.count for s in stores}
    for store in stores:
        if store.manifest.get("partition") is None:
            raise StoreError(f"{store.folder} is not a partial store (it was not written with a "
                             "partition); only partial stores are merged.")
    if len(counts) != 1:
        raise StoreError(f"the stores were written with different partition counts "
                         f"{sorted(counts)}; merge the partitions of one run.")
    count = counts.pop()
    for store in stores:
        index = store.partition.index
        if index in seen:
            raise StoreError(f"partition {store.partition} is given twice: {seen[index].folder} "
                             f"and {store.folder}; pass each partition once.")
        seen[index] = store
    missing = [f"{i}/{count}" for i in range(count) if i not in seen]
    if missing:
        raise StoreError(f"partitions {', '.join(missing)} are missing; run them "
                         f"(partition='{missing[0]}', ...) and merge all {count}.")


def _read_across(stores: list[ScoreStore], rows: range, cols: range) -> torch.Tensor:
    pieces = []
    for store in stores:
        lo, hi = max(cols.start, store.columns.start), min(cols.stop, store.columns.stop)
        if lo < hi:
            pieces.append(store.read(rows, range(lo, hi)))
    return torch.cat(pieces, dim=1)


def _without_partition(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("partition", "columns")}


# -- fingerprints and manifests ---------------------------------------------------------------
def fingerprint(value) -> str:
    """sha256 of a nested structure of tensors, arrays, numbers and strings (dicts, lists,
    tuples): dtype, shape and bytes of every tensor, ``repr`` of everything else."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h, value) -> None:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        h.update(f"tensor{value.dtype}{tuple(value.shape)}".encode())
        if value.dtype == torch.bfloat16:
            value = value.view(torch.int16)
        h.update(value.reshape(-1).numpy().view(np.uint8))  # the buffer itself, no copy
    elif isinstance(value, np.ndarray):
        h.update(f"array{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
    elif isinstance(value, dict):
        h.update(b"dict")
        for k in sorted(value, key=str):
            _feed(h, str(k))
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"seq{len(value)}".encode())
        for v in value:
            _feed(h, v)
    else:
        h.update(f"{type(value).__name__}:{value!r}".encode())


def first_difference(a, b, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The dotted path of the first place where two JSON-like values differ (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=_field_order):
            if key not in a or key not in b:
                return (*path, key)
            found = first_difference(a[key], b[key], (*path, key))
            if found is not None:
                return found
        return None
    return None if a == b else path


_FIELD_ORDER = ("kind", "format", "model_fingerprint", "data_fingerprints", "config", "shape",
                "dtype", "block_shape", "partition", "columns")


def _field_order(key: str):
    return (_FIELD_ORDER.index(key) if key in _FIELD_ORDER else len(_FIELD_ORDER), key)


def _lookup(value, path):
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return "<missing>"
        value = value[key]
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _hint(path) -> str:
    if path[:1] == ("model_fingerprint",):
        return " (the model's parameters differ)"
    if path[:1] == ("data_fingerprints",):
        return f" (the {path[1]!r} data set differs)" if len(path) > 1 else " (the data differ)"
    return ""


def _grid(manifest: dict) -> tuple[int, int]:
    n_query, (start, stop) = manifest["shape"][0], manifest["columns"]
    bq, bt = manifest["block_shape"]
    return (-(-n_query // bq), -(-(stop - start) // bt))


def _encode(scores: torch.Tensor, dtype: str) -> np.ndarray:
    t = scores.detach().cpu().to(STORE_DTYPES[dtype])
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _decode(values: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(values).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(values))


def _jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True))
