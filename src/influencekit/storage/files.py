"""File primitives every store is built from: safe names, atomic writes, checksummed JSON.

- :func:`safe_path` joins a folder and ONE file name, refusing names that could leave the folder
  (path separators, ``..``, absolute paths, NUL): names from the user or from a manifest go
  through it before any file is opened.
- :func:`atomic_write` writes a temporary file beside the target, flushes and ``fsync``s it, then
  ``os.replace``s it over the target and ``fsync``s the folder: a reader sees the old file or the
  new one, never a mixture, even when the writer is killed.
- :func:`write_json` / :func:`read_json` store a JSON object with a ``"checksum"`` entry (sha256
  of the canonical JSON of the other entries), so an edited, truncated or bit-flipped manifest is
  refused on load with a :class:`StoreError` instead of loading different settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from ..errors import StoreError

CHECKSUM_KEY = "checksum"


def safe_path(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name`` for a plain file name; :class:`StoreError` if ``name`` could escape.

    Refused: empty names, ``.`` and ``..``, names holding ``/``, ``\\`` or NUL, absolute paths,
    and anything that is not a ``str``.
    """
    if not isinstance(name, str):
        raise StoreError(f"a file name in a store must be a string, got {type(name).__name__} "
                         f"({name!r}); pass a plain name such as 'part-0.npy'.")
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name
           or os.path.isabs(name) or (os.altsep is not None and os.altsep in name))
    if bad:
        raise StoreError(f"the file name {name!r} could leave the store folder {folder}: a name "
                         "must be one plain component (no '/', '\\', '..', absolute path or NUL)."
                         " Rename it, e.g. replace separators with '_'.")
    return Path(folder) / name


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically: temporary file, fsync, ``os.replace``, fsync dir.

    The temporary name is unique per call, so concurrent writers never share one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def canonical_json(value) -> bytes:
    """The bytes a checksum is taken over: sorted keys, no spaces, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def json_roundtrip(value):
    """``value`` as it will read back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, sort_keys=True))


def write_json(path: Path, record: dict) -> dict:
    """Write ``record`` plus its checksum atomically; return what :func:`read_json` will give."""
    if CHECKSUM_KEY in record:
        raise StoreError(f"the entry {CHECKSUM_KEY!r} is reserved for the manifest checksum; "
                         "rename that entry.")
    body = json_roundtrip(record)
    stored = dict(body, **{CHECKSUM_KEY: sha256_bytes(canonical_json(body))})
    # no trailing newline: cutting any byte off the file leaves invalid JSON
    atomic_write(path, json.dumps(stored, indent=2, sort_keys=True).encode())
    return body


def read_json(path: Path, fix: str) -> dict:
    """Read a JSON object written by :func:`write_json` and verify its checksum.

    ``fix`` is the sentence that tells the user what to do when the file is refused. Every
    refusal is a :class:`StoreError` naming the file and what is wrong.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise StoreError(f"{path} is missing; {fix}") from exc
    except OSError as exc:
        raise StoreError(f"{path} cannot be read ({exc}); {fix}") from exc
    try:
        stored = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise StoreError(f"{path} is not UTF-8 text (byte {exc.start} is invalid): it is "
                         f"corrupt; {fix}") from exc
    except ValueError as exc:  # JSONDecodeError, or a number beyond Python's digit limit
        raise StoreError(f"{path} is not valid JSON ({exc}): it is corrupt or truncated; "
                         f"{fix}") from exc
    except RecursionError as exc:
        raise StoreError(f"{path} is not a manifest (nested too deeply); {fix}") from exc
    if not isinstance(stored, dict):
        raise StoreError(f"{path} holds a JSON {type(stored).__name__}, not an object: it is "
                         f"corrupt; {fix}")
    checksum = stored.pop(CHECKSUM_KEY, None)
    if checksum is None:
        raise StoreError(f"{path} has no {CHECKSUM_KEY!r} entry (written by an older "
                         f"influencekit, or edited); {fix}")
    if checksum != sha256_bytes(canonical_json(stored)):
        raise StoreError(f"{path} does not match its own checksum: it was modified or "
                         f"corrupted after it was written; {fix}")
    return stored
