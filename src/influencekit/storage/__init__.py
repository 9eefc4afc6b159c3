"""Files: safetensors + JSON manifest."""

from .memmap import ResultsArray
from .store import load_inverse, load_tensors, save_inverse, save_tensors

__all__ = ["save_tensors", "load_tensors", "save_inverse", "load_inverse", "ResultsArray"]
