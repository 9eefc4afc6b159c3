"""Offline data-set loaders: shapes, label ranges, IDX parsing and the missing-data error."""

import gzip
import struct

import numpy as np
import pytest
import torch

from influencekit.data import digits, fashion_mnist, fashion_mnist_available, read_idx
from influencekit.errors import DataUnavailableError


def test_digits_split_shapes_labels_and_standardisation():
    split = digits(test_fraction=0.2, seed=0)
    x_tr, y_tr = split.train
    x_te, y_te = split.test
    assert x_tr.shape[1] == x_te.shape[1] == 64
    assert x_tr.shape[0] + x_te.shape[0] == 1797
    assert x_te.shape[0] == 360  # ceil(0.2 * 1797)
    assert y_tr.dtype == torch.int64
    assert set(y_tr.tolist()) == set(range(10)) and set(y_te.tolist()) <= set(range(10))
    # Standardised with the training statistics: mean 0, std 1 (or 0 for constant pixels).
    np.testing.assert_allclose(x_tr.double().mean(0).numpy(), 0.0, atol=1e-6)
    std = x_tr.double().std(0, unbiased=False).numpy()
    assert np.all((np.abs(std - 1) < 1e-5) | (std < 1e-12))


def test_digits_raw_pixels_match_sklearn():
    from sklearn.datasets import load_digits
    split = digits(standardize=False, dtype=torch.float64)
    raw = load_digits().data
    rows = {tuple(r) for r in raw}
    assert all(tuple(r) in rows for r in split.test[0].numpy()[:20])
    assert float(split.train[0].max()) == 16.0


def _write_idx(path, array, magic):
    header = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(folder, n_train=7, n_test=3):
    rng = np.random.default_rng(1)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = rng.integers(0, 10, size=n)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
        arrays[prefix] = (images, labels)
    return arrays


def test_fashion_mnist_reads_idx_files_exactly(tmp_path):
    arrays = _fake_fashion(tmp_path)
    split = fashion_mnist(root=tmp_path, normalize=False, dtype=torch.float64)
    images, labels = arrays["train"]
    assert split.train[0].shape == (7, 1, 28, 28) and split.test[0].shape == (3, 1, 28, 28)
    np.testing.assert_allclose(split.train[0][:, 0].numpy(), images / 255.0)
    np.testing.assert_array_equal(split.train[1].numpy(), labels)
    np.testing.assert_array_equal(split.test[1].numpy(), arrays["t10k"][1])


def test_fashion_mnist_subset_and_normalisation(tmp_path):
    arrays = _fake_fashion(tmp_path, n_train=20)
    split = fashion_mnist(root=tmp_path, n_train=5, seed=3, dtype=torch.float64)
    x, _ = split.train
    assert x.shape == (5, 1, 28, 28)
    assert abs(float(x.mean())) < 1e-12 and abs(float(x.std(unbiased=False)) - 1) < 1e-12
    # Without normalisation each kept example is one of the originals, with its own label.
    raw = fashion_mnist(root=tmp_path, n_train=5, seed=3, normalize=False, dtype=torch.float64)
    originals = arrays["train"][0].reshape(20, -1) / 255.0
    for row, label in zip(raw.train[0].reshape(5, -1).numpy(), raw.train[1].tolist(), strict=True):
        match = np.flatnonzero(np.all(originals == row, axis=1))
        assert len(match) == 1 and arrays["train"][1][match[0]] == label
    np.testing.assert_allclose(x.numpy(), (raw.train[0].numpy() - raw.train[0].numpy().mean())
                               / raw.train[0].numpy().std())


def test_fashion_mnist_missing_files_name_the_install_command(tmp_path):
    with pytest.raises(DataUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist(root=tmp_path / "nowhere")
    assert not fashion_mnist_available(tmp_path / "nowhere")


def test_idx_rejects_a_wrong_magic_and_truncation(tmp_path):
    path = tmp_path / "bad.gz"
    _write_idx(path, np.zeros((2, 3)), 2049)
    with pytest.raises(DataUnavailableError, match="magic"):
        read_idx(path, 2051)
    header = struct.pack(">i", 2049) + struct.pack(">i", 10)
    with gzip.open(path, "wb") as handle:
        handle.write(header + bytes(4))
    with pytest.raises(DataUnavailableError, match="truncated"):
        read_idx(path, 2049)


@pytest.mark.skipif(not fashion_mnist_available(), reason="dataset-fashion-mnist not installed")
def test_installed_fashion_mnist_shapes_and_labels():
    split = fashion_mnist(n_train=500, n_test=100)
    assert split.train[0].shape == (500, 1, 28, 28) and split.test[0].shape == (100, 1, 28, 28)
    assert set(split.train[1].tolist()) <= set(range(10))
    assert len(set(split.train[1].tolist())) == 10
