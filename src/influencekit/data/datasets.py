"""Loaders for the offline data sets of ``shared/DATA.md`` (no download ever happens here).

Each loader returns a :class:`DataSplit` whose ``train`` and ``test`` are ``(x, y)`` tuples of
tensors, the layout every influencekit function accepts as data. Labels are ``int64`` class ids.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataUnavailableError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


@dataclass(frozen=True)
class DataSplit:
    """``train = (x [n_train, ...], y [n_train])`` and ``test = (x [n_test, ...], y [n_test])``."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    classes: tuple[str, ...]


def digits(test_fraction: float = 0.2, seed: int = 0, standardize: bool = True,
           dtype: torch.dtype = torch.float32) -> DataSplit:
    """scikit-learn's bundled 8x8 digits: x ``[n, 64]``, y ``[n]`` in 0..9 (1,797 in all).

    The split is stratified and fixed by ``seed``. With ``standardize`` every pixel is shifted
    and scaled by the TRAINING mean and standard deviation (constant pixels are only shifted).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.data.astype(np.float64)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                              stratify=y)
    if standardize:
        mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
        std[std == 0] = 1.0
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return DataSplit(train=(torch.as_tensor(x_tr, dtype=dtype), torch.as_tensor(y_tr)),
                     test=(torch.as_tensor(x_te, dtype=dtype), torch.as_tensor(y_te)),
                     classes=tuple(str(c) for c in range(10)))


def fashion_mnist(root: str | os.PathLike | None = None, n_train: int | None = None,
                  n_test: int | None = None, seed: int = 0, normalize: bool = True,
                  dtype: torch.dtype = torch.float32) -> DataSplit:
    """Fashion-MNIST from the Debian package's IDX files: x ``[n, 1, 28, 28]``, y ``[n]`` in 0..9.

    Args:
        root: folder with ``train-images-idx3-ubyte.gz`` etc.; default the apt location
            ``/usr/share/datasets/fashion-mnist`` (or ``$INFLUENCEKIT_FASHION_MNIST``).
        n_train, n_test: take a random subset of this size (fixed by ``seed``); None keeps all
            (60,000 / 10,000).
        normalize: pixels in [0, 1] are shifted and scaled by the training-set mean and standard
            deviation of the returned subset; otherwise they stay in [0, 1].

    Raises :class:`DataUnavailableError` naming the install command when the files are absent.
    """
    folder = Path(root or os.environ.get("INFLUENCEKIT_FASHION_MNIST", FASHION_MNIST_ROOT))
    x_tr, y_tr = _idx_pair(folder, "train")
    x_te, y_te = _idx_pair(folder, "t10k")
    rng = np.random.default_rng(seed)
    x_tr, y_tr = _subset(x_tr, y_tr, n_train, rng)
    x_te, y_te = _subset(x_te, y_te, n_test, rng)
    x_tr = x_tr.astype(np.float64) / 255.0
    x_te = x_te.astype(np.float64) / 255.0
    if normalize:
        mean, std = x_tr.mean(), max(x_tr.std(), 1e-12)
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    as_x = lambda a: torch.as_tensor(a[:, None], dtype=dtype)  # noqa: E731
    return DataSplit(train=(as_x(x_tr), torch.as_tensor(y_tr.astype(np.int64))),
                     test=(as_x(x_te), torch.as_tensor(y_te.astype(np.int64))),
                     classes=FASHION_MNIST_CLASSES)


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    """Whether the four Fashion-MNIST IDX files are present."""
    folder = Path(root or os.environ.get("INFLUENCEKIT_FASHION_MNIST", FASHION_MNIST_ROOT))
    return all((folder / f"{p}-{k}-idx{d}-ubyte.gz").is_file()
               for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1)))


def _idx_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", _IDX_IMAGES_MAGIC)
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataUnavailableError(
            f"{folder}: {prefix} images ({images.shape[0]}) and labels ({labels.shape[0]}) "
            f"disagree; the files are damaged. Reinstall with `{FASHION_MNIST_INSTALL}`.")
    return images, labels


def read_idx(path: Path, magic: int) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes as ``uint8 [n, *dims]``; checks magic and size."""
    if not path.is_file():
        raise DataUnavailableError(
            f"Fashion-MNIST file {path} is missing. Install the data set with "
            f"`{FASHION_MNIST_INSTALL}` (files go to {FASHION_MNIST_ROOT}), or pass root= / set "
            "INFLUENCEKIT_FASHION_MNIST to a folder holding the four IDX .gz files.")
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    n_dims = magic & 0xFF
    header = 4 + 4 * n_dims
    found_magic = struct.unpack(">i", raw[:4])[0] if len(raw) >= 4 else None
    if found_magic != magic or len(raw) < header:
        raise DataUnavailableError(
            f"{path} is not an IDX file of {n_dims}-dimensional unsigned bytes (magic "
            f"{found_magic}, expected {magic}); reinstall with `{FASHION_MNIST_INSTALL}`.")
    dims = struct.unpack(f">{n_dims}i", raw[4:header])
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise DataUnavailableError(
            f"{path} holds {data.size} values but its header says {dims}; the file is "
            f"truncated. Reinstall with `{FASHION_MNIST_INSTALL}`.")
    return data.reshape(dims)


def _subset(x: np.ndarray, y: np.ndarray, n: int | None, rng: np.random.Generator):
    if n is None or n >= len(y):
        return x, y
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    keep = np.sort(rng.choice(len(y), size=n, replace=False))
    return x[keep], y[keep]


# -- the demo's split: pixels scaled to [0, 1] so the report can show them as images ---------
@dataclass
class Split:
    """``x_train [n, 64]`` in [0, 1], ``y_train [n]``, ``x_test``, ``y_test``; images are 8x8."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    image_shape: tuple[int, int] = (8, 8)


def load_digits_split(n_train: int = 1200, seed: int = 0, dtype=torch.float64) -> Split:
    """A fixed random split of the digits; pixels scaled from 0..16 to 0..1."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    if not 0 < n_train < len(x):
        raise ValueError(f"n_train must be between 1 and {len(x) - 1}, got {n_train}")
    train, test = order[:n_train], order[n_train:]
    x = torch.tensor(x / 16.0, dtype=dtype)
    y = torch.tensor(y, dtype=torch.long)
    return Split(x[train], y[train], x[test], y[test])
