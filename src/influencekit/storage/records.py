"""The pieces every resumable array store is built from (results arrays, score stores).

- :func:`new_npy`: a zero-filled ``.npy`` file, returning what a manifest records about it
  (header offset, exact size, sha256 of the header), and :func:`check_npy`, which verifies a
  file against that record (missing, truncated, appended to, header modified);
- :func:`digest`: the 16-byte checksum record of one unit of work (a row, a block):
  ``sha256(store_id ‖ index ‖ bytes)[:16]``; an all-zero record means "not done", so the record
  doubles as the done flag. The store's random ``store_id`` makes records of two stores differ,
  so a file swapped in from another store never matches;
- :func:`pwrite_all`: positional writes (``os.pwrite``), never a writable memmap, so two
  writers on disjoint byte ranges never write back each other's pages;
- :func:`create_staged`: a store folder built in a staging folder beside it and renamed into
  place, so a reader never sees half a store and two processes creating it at once end up
  sharing one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import StoreError
from .files import fsync_folder, safe_path, sha256_bytes

RECORD_BYTES = 16


def digest(store_id: str, index: tuple[int, ...], data: bytes) -> bytes:
    """The 16-byte record of the unit ``index`` (a row ``(r,)`` or a block ``(qi, ti)``) whose
    bytes are ``data``, in the store ``store_id``."""
    h = hashlib.sha256(store_id.encode())
    for i in index:
        h.update(int(i).to_bytes(8, "little"))
    h.update(data)
    return h.digest()[:RECORD_BYTES]


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of the open file ``fd`` (``os.pwrite`` may write
    less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def new_npy(path: Path, shape, dtype) -> dict:
    """A zero-filled ``.npy`` file; returns ``{"offset", "bytes", "header_sha256"}``."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype),
                                      shape=tuple(int(s) for s in shape))
    offset = int(array.offset)
    array.flush()
    del array
    with open(path, "rb+") as handle:
        header = handle.read(offset)
        size = handle.seek(0, os.SEEK_END)
        os.fsync(handle.fileno())
    if offset % RECORD_BYTES:
        raise StoreError(f"numpy wrote a .npy header of {offset} bytes, not a multiple of "
                         f"{RECORD_BYTES}; this numpy version is not supported.")
    return {"offset": offset, "bytes": size, "header_sha256": sha256_bytes(header)}


def check_npy(path: Path, info: dict, fix: str) -> None:
    """Verify one ``.npy`` file against its record from :func:`new_npy`: it exists, has exactly
    the recorded size and an unmodified header; else :class:`StoreError` naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header = handle.read(int(info["offset"]))
    except FileNotFoundError as exc:
        raise StoreError(f"{path} is missing from the store; {fix}.") from exc
    except OSError as exc:
        raise StoreError(f"{path} cannot be read ({exc}); {fix}.") from exc
    if size != info["bytes"]:
        what = ("truncated" if size < info["bytes"] else
                f"longer than written ({size - info['bytes']} bytes appended)")
        raise StoreError(f"{path} is {what}: {size} bytes, expected {info['bytes']}; {fix}.")
    if sha256_bytes(header) != info["header_sha256"]:
        raise StoreError(f"the .npy header of {path} was modified (its checksum in the "
                         f"manifest does not match); {fix}.")


def valid_file_record(info) -> bool:
    """A manifest's record of one ``.npy`` file has the entries :func:`check_npy` reads."""
    return (isinstance(info, dict) and all(type(info.get(k)) is int for k in ("offset", "bytes"))
            and isinstance(info.get("header_sha256"), str))


def create_staged(folder: Path, marker: str, build: Callable[[Path], None], fix: str) -> None:
    """Build a store with ``build(staging_folder)`` and rename it to ``folder``.

    ``marker`` is the file whose presence makes a folder a store (its manifest). If another
    process created the store first, its store is kept (the caller then opens it). A folder
    holding files but no ``marker`` is refused with :class:`StoreError`.
    """
    def not_a_store():
        return StoreError(f"{folder} holds files but no {marker}: it is not a store, or "
                          f"{safe_path(folder, marker)} was deleted. Use an empty folder, or "
                          f"{fix}.")

    if folder.is_dir() and any(folder.iterdir()) and not safe_path(folder, marker).exists():
        raise not_a_store()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        build(staging)
        fsync_folder(staging)
        try:
            os.rename(staging, folder)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if not safe_path(folder, marker).exists():
                raise not_a_store() from exc
        fsync_folder(folder.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


class WriterFiles:
    """Open file descriptors of a store's writer (``self._fds``: file name -> fd), closed by
    :meth:`close`, at the end of a ``with`` block, or when the store is collected."""

    _fds: dict[str, int]

    def close(self) -> None:
        """Close the file descriptors used for writing (reopened on the next write)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
