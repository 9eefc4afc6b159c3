"""Score stores: a ``[n_query, n_train]`` score matrix on disk, written block by block.

A store is a folder holding

- ``scores.npy``: the scores of the training examples ``columns`` (all of them, or one
  partition's contiguous share), ``[n_query, len(columns)]``, as an ``.npy`` memmap
  (bfloat16 is kept as its raw 16-bit pattern, dtype ``uint16`` in numpy);
- ``done.npy``: ``[n_query_blocks, n_train_blocks]`` booleans, one per block of the grid
  ``block_shape`` (blocks start at the store's first row and column);
- ``manifest.json``: the run that made it: format, full shape, columns, partition, block shape,
  dtype, model fingerprint, data fingerprints and a free-form ``config`` (inverse, task, dtypes).

Blocks are committed in groups: written blocks are flushed to disk (``msync``) BEFORE their done
flags are set and flushed, at most every ``commit_seconds`` (and at :meth:`ScoreStore.commit`).
So a process killed at any point, or a machine that goes down, leaves only whole blocks marked
done (a kill loses at most the last ``commit_seconds`` of work); reopening the store with the
same manifest resumes, and reopening it with a different one raises :class:`StoreError` naming
the field that differs.
Scores follow the conventions table (``s = g_qᵀ (C + λI)⁻¹ g_m``, no 1/n).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..distributed import Partition
from ..errors import StoreError

SCORES = "scores.npy"
DONE = "done.npy"
MANIFEST = "manifest.json"
SCORE_STORE_FORMAT = 1
STORE_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
_NUMPY = {"float64": np.float64, "float32": np.float32, "bfloat16": np.uint16}


class ScoreStore:
    """A ``[n_query, n_train]`` score matrix (or one partition's columns of it) on disk.

    Open with :meth:`open` (create or resume) or :meth:`load` (an existing store). Blocks are
    addressed by their grid position ``(qi, ti)``: rows ``qi * block_shape[0] ...`` and columns
    ``columns.start + ti * block_shape[1] ...`` of the full matrix.
    """

    def __init__(self, folder: Path, scores: np.memmap, done: np.memmap, manifest: dict,
                 commit_seconds: float = 1.0):
        self.folder = folder
        self._scores = scores
        self._done = done
        self.manifest = manifest
        self.commit_seconds = commit_seconds
        self._pending: set[tuple[int, int]] = set()
        self._last_commit = time.monotonic()

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
        if (folder / MANIFEST).exists():
            store = cls.load(folder)
            store.check_same_run(manifest)
        else:
            store = cls._create(folder, manifest)
        store.commit_seconds = commit_seconds
        return store

    @classmethod
    def _create(cls, folder: Path, manifest: dict) -> ScoreStore:
        folder.mkdir(parents=True, exist_ok=True)
        n_query, start, stop = manifest["shape"][0], *manifest["columns"]
        scores = np.lib.format.open_memmap(folder / SCORES, mode="w+",
                                           dtype=_NUMPY[manifest["dtype"]],
                                           shape=(n_query, stop - start))
        done = np.lib.format.open_memmap(folder / DONE, mode="w+", dtype=bool,
                                         shape=_grid(manifest))
        scores.flush()
        done.flush()
        # the manifest last (atomically): a folder without it is a store not yet created
        tmp = folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, folder / MANIFEST)
        return cls(folder, scores, done, manifest)

    @classmethod
    def load(cls, folder, writable: bool = True) -> ScoreStore:
        """Open an existing store (``writable=False``: read only)."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.exists():
            raise StoreError(f"no score store at {folder}: {MANIFEST} is missing. Run the "
                             "scoring with store= this folder first.")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path} is not valid JSON ({exc}); the score store is corrupt: "
                             "delete the folder to start again.") from exc
        if manifest.get("kind") != "scores" or manifest.get("format") != SCORE_STORE_FORMAT:
            raise StoreError(f"{folder} is not a score store of format {SCORE_STORE_FORMAT} "
                             f"(kind {manifest.get('kind')!r}, format "
                             f"{manifest.get('format')!r}).")
        mode = "r+" if writable else "r"
        try:
            scores = np.lib.format.open_memmap(folder / SCORES, mode=mode)
            done = np.lib.format.open_memmap(folder / DONE, mode=mode)
        except (OSError, ValueError) as exc:
            raise StoreError(f"the score files in {folder} cannot be read ({exc}); they are "
                             "truncated or corrupt: delete the folder to start again.") from exc
        start, stop = manifest["columns"]
        expected = (manifest["shape"][0], stop - start)
        if (scores.shape != expected or scores.dtype != _NUMPY[manifest["dtype"]]
                or done.shape != _grid(manifest) or done.dtype != bool):
            raise StoreError(f"the score files in {folder} do not match {MANIFEST} (scores "
                             f"{scores.shape} {scores.dtype}, done {done.shape}); the store is "
                             "corrupt: delete the folder to start again.")
        return cls(folder, scores, done, manifest)

    def check_same_run(self, manifest: dict) -> None:
        """Raise :class:`StoreError` naming the first field where ``manifest`` differs."""
        path = first_difference(self.manifest, manifest)
        if path is None:
            return
        stored, wanted = _lookup(self.manifest, path), _lookup(manifest, path)
        raise StoreError(
            f"the score store {self.folder} was made by another run: its {'.'.join(path)} is "
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
        return bool(self._done[qi, ti]) or (qi, ti) in self._pending

    def done(self) -> np.ndarray:
        """The done-mask ``[n_query_blocks, n_train_blocks]`` (a copy; includes blocks written
        by this process and not yet committed)."""
        mask = np.array(self._done)
        for qi, ti in self._pending:
            mask[qi, ti] = True
        return mask

    @property
    def complete(self) -> bool:
        return bool(self.done().all())

    def commit(self) -> None:
        """Flush the blocks written since the last commit, then mark them done and flush."""
        if self._pending:
            self._scores.flush()
            for qi, ti in self._pending:
                self._done[qi, ti] = True
            self._done.flush()
            self._pending.clear()
        self._last_commit = time.monotonic()

    def write_block(self, qi: int, ti: int, scores: torch.Tensor | np.ndarray) -> None:
        """Store block ``(qi, ti)`` (rounded to the store's dtype); it is marked done at the
        next commit (automatic after ``commit_seconds``; call :meth:`commit` when finished)."""
        rows, cols = self.block_rows(qi), self.block_columns(ti)
        scores = torch.as_tensor(scores)
        if tuple(scores.shape) != (len(rows), len(cols)):
            raise StoreError(f"block ({qi}, {ti}) of {self.folder} has shape "
                             f"({len(rows)}, {len(cols)}), got {tuple(scores.shape)}.")
        local = slice(cols.start - self.columns.start, cols.stop - self.columns.start)
        self._scores[rows.start:rows.stop, local] = _encode(scores, self.manifest["dtype"])
        self._pending.add((qi, ti))
        if time.monotonic() - self._last_commit >= self.commit_seconds:
            self.commit()

    def discard_block(self, qi: int, ti: int) -> None:
        """Mark block ``(qi, ti)`` not done: the next run recomputes it."""
        self._pending.discard((qi, ti))
        self._done[qi, ti] = False
        self._done.flush()

    def read_block(self, qi: int, ti: int) -> torch.Tensor:
        """Block ``(qi, ti)`` as a tensor of the store's dtype (zeros where not done)."""
        rows, cols = self.block_rows(qi), self.block_columns(ti)
        return self.read(rows, cols)

    def read(self, rows: range | None = None, cols: range | None = None) -> torch.Tensor:
        """Scores of query ``rows`` × training examples ``cols`` (global indices, within this
        store's columns; default all), as a tensor of the store's dtype."""
        rows = range(self.n_query) if rows is None else rows
        cols = self.columns if cols is None else cols
        if cols.start < self.columns.start or cols.stop > self.columns.stop:
            raise StoreError(f"columns {cols.start}..{cols.stop - 1} are outside this store's "
                             f"training examples {self.columns.start}..{self.columns.stop - 1}.")
        local = slice(cols.start - self.columns.start, cols.stop - self.columns.start)
        return _decode(np.array(self._scores[rows.start:rows.stop, local]),
                       self.manifest["dtype"])

    def scores(self) -> torch.Tensor:
        """The whole ``[n_query, len(columns)]`` matrix in memory (the store's dtype)."""
        return self.read()

    def raw(self) -> np.memmap:
        """The memmapped array itself (bfloat16 as ``uint16`` bit patterns)."""
        return self._scores


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
                f"{store.folder} and {first.folder} belong to different runs: their "
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
