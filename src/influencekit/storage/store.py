"""The only place that touches files: safetensors tensors beside a JSON manifest.

A saved object is a folder holding ``tensors.safetensors`` and ``manifest.json``. The manifest
records the format version, what was saved (e.g. an inverse's config), free-form metadata and a
sha256 of the tensor file, so a truncated or edited file is detected on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import StoreError

FORMAT_VERSION = 1
TENSORS = "tensors.safetensors"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], manifest: dict):
    """Write ``tensors`` and ``manifest`` atomically (temporary files, then rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp_tensors = folder / (TENSORS + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp_tensors))
    record = {"format_version": FORMAT_VERSION, "sha256": _sha256(tmp_tensors), **manifest}
    tmp_manifest = folder / (MANIFEST + ".tmp")
    tmp_manifest.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp_tensors, folder / TENSORS)
    os.replace(tmp_manifest, folder / MANIFEST)


def load_tensors(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read what :func:`save_tensors` wrote; raise :class:`StoreError` if missing or corrupt."""
    folder = Path(folder)
    manifest_path, tensor_path = folder / MANIFEST, folder / TENSORS
    if not manifest_path.exists() or not tensor_path.exists():
        raise StoreError(f"no store at {folder}: expected {MANIFEST} and {TENSORS} there. "
                         "Save one first (e.g. ik.storage.save_inverse).")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise StoreError(f"{manifest_path} is not valid JSON ({exc}); the store is corrupt, "
                         "delete the folder and save again.") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{folder} has store format {manifest.get('format_version')}, this "
                         f"influencekit reads format {FORMAT_VERSION}; save it again.")
    if _sha256(tensor_path) != manifest.get("sha256"):
        raise StoreError(f"{tensor_path} does not match the checksum in its manifest (truncated "
                         "or modified); delete the folder and save again.")
    try:
        tensors = load_file(str(tensor_path))
    except SafetensorError as exc:
        raise StoreError(f"{tensor_path} cannot be read ({exc}); save again.") from exc
    return tensors, manifest


def save_inverse(folder, inverse) -> None:
    """Save a fitted inverse: its config, fit_info (incl. model fingerprint) and tensors."""
    save_tensors(folder, inverse.state_dict(),
                 {"kind": "inverse", "config": inverse.get_config(),
                  "fit_info": inverse.fit_info_})


def load_inverse(folder, target=None):
    """Load an inverse saved by :func:`save_inverse`.

    With ``target``, check that the stored fingerprint (parameter names, shapes and values)
    matches it and raise :class:`StoreError` if the store was fitted for another model.
    """
    from ..inverse.base import REGISTRY

    tensors, manifest = load_tensors(folder)
    if manifest.get("kind") != "inverse":
        raise StoreError(f"{folder} holds a {manifest.get('kind')!r}, not an inverse")
    config = dict(manifest["config"])
    method = config.pop("method")
    if method not in REGISTRY:
        raise StoreError(f"{folder} holds an inverse of unknown method {method!r}; known: "
                         f"{sorted(REGISTRY)}")
    fit_info = manifest["fit_info"]
    if target is not None and target.fingerprint() != fit_info.get("fingerprint"):
        raise StoreError(f"the inverse in {folder} was fitted for another model (fingerprint "
                         "mismatch: different parameters or values); fit it again for this "
                         "model.")
    return REGISTRY[method](**config).load_state_dict(tensors, fit_info)
