"""Files: safetensors + checksummed JSON manifests, resumable result arrays, data fingerprints,
score stores and their merge.

Every stored file is checksummed and verified on load; every refusal is a
:class:`~influencekit.errors.StoreError` naming the file, the problem and the fix.
"""

from .files import atomic_write, safe_path
from .fingerprint import data_fingerprint
from .gradients import GradientStore
from .memmap import ResultsArray
from .scores import ScoreStore, fingerprint, merge_score_stores
from .store import load_inverse, load_tensors, save_inverse, save_tensors

__all__ = ["save_tensors", "load_tensors", "save_inverse", "load_inverse", "ResultsArray",
           "data_fingerprint", "safe_path", "atomic_write", "ScoreStore", "merge_score_stores",
           "fingerprint", "GradientStore"]
