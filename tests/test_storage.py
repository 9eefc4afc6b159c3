"""Store round trip, and clear errors for corrupt or mismatched stores."""

import json

import pytest
import torch

import influencekit as ik
from influencekit.errors import ModelMismatchError, StoreError
from influencekit.storage import load_inverse, save_inverse

from .helpers import classification_data, mlp


@pytest.fixture
def fitted():
    target = ik.Target(mlp(), ik.ClassificationTask())
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, classification_data(), "ggn"))
    return target, inverse


def test_round_trip_gives_identical_solves(tmp_path, fitted):
    target, inverse = fitted
    save_inverse(tmp_path / "inv", inverse)
    loaded = load_inverse(tmp_path / "inv", target)
    assert loaded.get_config() == inverse.get_config()
    g = torch.randn(4, target.num_params, dtype=torch.float64)
    assert torch.equal(loaded.solve(g), inverse.solve(g))
    manifest = json.loads((tmp_path / "inv" / "manifest.json").read_text())
    assert manifest["fit_info"]["fingerprint"] == target.fingerprint()


def test_corrupt_tensor_file(tmp_path, fitted):
    _, inverse = fitted
    save_inverse(tmp_path / "inv", inverse)
    path = tmp_path / "inv" / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum.*save again"):
        load_inverse(tmp_path / "inv")


def test_missing_and_garbled_manifest(tmp_path, fitted):
    _, inverse = fitted
    with pytest.raises(StoreError, match="no store"):
        load_inverse(tmp_path / "nothing")
    save_inverse(tmp_path / "inv", inverse)
    (tmp_path / "inv" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        load_inverse(tmp_path / "inv")


def test_store_of_another_model_is_rejected(tmp_path, fitted):
    _, inverse = fitted
    save_inverse(tmp_path / "inv", inverse)
    other = ik.Target(mlp(seed=1), ik.ClassificationTask())
    with pytest.raises(ModelMismatchError, match="belongs to another model"):
        load_inverse(tmp_path / "inv", other)
