"""The only place that touches files: safetensors tensors beside a JSON manifest.

A saved object is a folder holding ``tensors.safetensors`` and ``manifest.json``. Both are
checksummed and both checksums are verified on load:

- the manifest records the format version, a random ``store_id``, what was saved (e.g. an
  inverse's config), free-form metadata and the sha256 of the tensor file;
- the manifest carries its own checksum (see :mod:`influencekit.storage.files`), so a bit flip
  that turns ``damping`` 0.001 into 0.003 is refused instead of loaded;
- the tensor file embeds the ``store_id`` in its safetensors metadata, so two stores never hold
  byte-identical tensor files and a manifest copied from another store is refused.

Every refusal is a :class:`~influencekit.errors.StoreError` naming the file, the problem and the
fix. Both files are written atomically; a writer killed between the two renames leaves a tensor
file that does not match the manifest, which is refused on load (never loaded silently).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..errors import InfluenceKitError, ModelMismatchError, StoreError
from .files import atomic_write, read_json, safe_path, sha256_bytes, write_json

FORMAT_VERSION = 2
TENSORS = "tensors.safetensors"
MANIFEST = "manifest.json"
RESERVED = ("format_version", "store_id", "tensors_sha256")


def save_tensors(folder: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 manifest: dict) -> None:
    """Write ``tensors`` (name -> tensor) and the JSON-serialisable ``manifest`` into ``folder``.

    Each file is written atomically (temporary file, fsync, rename). The entries
    ``format_version``, ``store_id``, ``tensors_sha256`` and ``checksum`` are reserved.
    """
    folder = Path(folder)
    clash = [key for key in (*RESERVED, "checksum") if key in manifest]
    if clash:
        raise StoreError(f"manifest entries {clash} are reserved by influencekit's store "
                         "format; rename them.")
    bad = [name for name, value in tensors.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise StoreError(f"save_tensors stores tensors only; {bad} are not tensors. Put other "
                         "values in the manifest (JSON).")
    folder.mkdir(parents=True, exist_ok=True)
    store_id = uuid.uuid4().hex
    data = save_safetensors(_unshared(tensors), metadata={"store_id": store_id})
    record = {"format_version": FORMAT_VERSION, "store_id": store_id,
              "tensors_sha256": sha256_bytes(data), **manifest}
    atomic_write(safe_path(folder, TENSORS), data)
    write_json(safe_path(folder, MANIFEST), record)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, copied where two share memory (safetensors refuses those)."""
    out, seen = {}, set()
    for name, value in tensors.items():
        value = value.detach().contiguous().cpu()
        pointer = value.untyped_storage().data_ptr() if value.numel() else None
        if pointer in seen:
            value = value.clone()
        elif pointer is not None:
            seen.add(pointer)
        out[name] = value
    return out


def load_tensors(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read what :func:`save_tensors` wrote: ``(tensors, manifest)``.

    Raises :class:`StoreError` if a file is missing, truncated, modified, from another store or
    from another format version.
    """
    folder = Path(folder)
    manifest_path, tensor_path = safe_path(folder, MANIFEST), safe_path(folder, TENSORS)
    fix = "the store is corrupt: delete the folder and save again."
    if not manifest_path.exists() and not tensor_path.exists():
        raise StoreError(f"no store at {folder}: expected {MANIFEST} and {TENSORS} there. "
                         "Save one first (e.g. ik.storage.save_inverse).")
    manifest = read_json(manifest_path, fix)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{manifest_path} has store format {manifest.get('format_version')!r}, "
                         f"this influencekit reads format {FORMAT_VERSION}; save it again.")
    try:
        data = tensor_path.read_bytes()
    except FileNotFoundError as exc:
        raise StoreError(f"{tensor_path} is missing; {fix}") from exc
    except OSError as exc:
        raise StoreError(f"{tensor_path} cannot be read ({exc}); {fix}") from exc
    if sha256_bytes(data) != manifest.get("tensors_sha256"):
        raise StoreError(f"{tensor_path} does not match the checksum in {manifest_path} "
                         f"(truncated, modified, or copied from another store); {fix}")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise StoreError(f"{tensor_path} cannot be read ({exc}); {fix}") from exc
    return tensors, manifest


def save_inverse(folder, inverse) -> None:
    """Save a fitted inverse: its config, fit_info (incl. model fingerprint) and tensors."""
    save_tensors(folder, inverse.state_dict(),
                 {"kind": "inverse", "config": inverse.get_config(),
                  "fit_info": inverse.fit_info_})


def load_inverse(folder, target=None):
    """Load an inverse saved by :func:`save_inverse`.

    With ``target``, check that the stored fingerprint (parameter names, shapes and values)
    matches it and raise :class:`~influencekit.errors.ModelMismatchError` if the store was
    fitted for another model (or this one before further training).
    """
    from ..inverse import REGISTRY

    tensors, manifest = load_tensors(folder)
    if manifest.get("kind") != "inverse":
        raise StoreError(f"{folder} holds a {manifest.get('kind')!r}, not an inverse; pass the "
                         "folder written by ik.storage.save_inverse.")
    config, fit_info = manifest.get("config"), manifest.get("fit_info")
    if not isinstance(config, dict) or not isinstance(fit_info, dict):
        raise StoreError(f"the manifest in {folder} lacks an inverse's 'config' or 'fit_info'; "
                         "save the inverse again.")
    config = dict(config)
    method = config.pop("method", None)
    if method not in REGISTRY:
        raise StoreError(f"{folder} holds an inverse of unknown method {method!r}; known: "
                         f"{sorted(REGISTRY)}")
    try:
        inverse = REGISTRY[method](**config).load_state_dict(tensors, fit_info)
    except InfluenceKitError:
        raise
    except (TypeError, KeyError, ValueError, RuntimeError) as exc:
        raise StoreError(f"the inverse in {folder} cannot be rebuilt from its manifest and "
                         f"tensors ({type(exc).__name__}: {exc}); it was saved by another "
                         "version of influencekit: fit and save it again.") from exc
    if target is not None:
        try:
            inverse.check_target(target)
        except ModelMismatchError as exc:
            raise ModelMismatchError(f"the inverse in {folder} belongs to another model: "
                                     f"{exc}") from None
    return inverse
