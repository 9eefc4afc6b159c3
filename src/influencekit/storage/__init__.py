"""Files: safetensors + JSON manifest; resumable memmaps; score stores and their merge."""

from .memmap import ResultsArray
from .scores import ScoreStore, fingerprint, merge_score_stores
from .store import load_inverse, load_tensors, save_inverse, save_tensors

__all__ = ["save_tensors", "load_tensors", "save_inverse", "load_inverse", "ResultsArray",
           "ScoreStore", "merge_score_stores", "fingerprint"]
