"""Every stored file is checksummed and verified on load; names cannot leave a store's folder;
stores record the data they were made for (see also test_reliability_campaign.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import influencekit as ik
from influencekit.errors import InfluenceKitError, StoreError
from influencekit.storage import (
    ResultsArray,
    atomic_write,
    data_fingerprint,
    load_inverse,
    load_tensors,
    safe_path,
    save_inverse,
    save_tensors,
)
from influencekit.testing import workers

from .helpers import classification_data, mlp


@pytest.fixture
def inverse_store(tmp_path):
    target = ik.Target(mlp(), ik.ClassificationTask())
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, classification_data(), "ggn"))
    save_inverse(tmp_path / "inv", inverse)
    return tmp_path / "inv", target, inverse


# -- manifests ------------------------------------------------------------------------------------
def test_manifest_edit_of_damping_is_refused(inverse_store):
    """The issue's case: one bit turns damping 0.001 into 0.003 ('1' ^ 0x02 = '3')."""
    folder, target, _ = inverse_store
    path = folder / "manifest.json"
    text = path.read_text()
    assert '"damping": 0.001' in text
    data = bytearray(text.encode())
    at = text.index('"damping": 0.001') + len('"damping": 0.00')
    data[at] ^= 0x02
    path.write_bytes(bytes(data))
    assert '"damping": 0.003' in path.read_text()
    with pytest.raises(StoreError, match="manifest.json does not match its own checksum"):
        load_inverse(folder, target)


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[1, 2]", "JSON list, not an object"),
    (b'{"a": 1', "not valid JSON"),
    (b'{"a": 1}', "no 'checksum' entry"),
    (b"1" * 5000, "not valid JSON"),  # beyond Python's integer digit limit: a bare ValueError
])
def test_manifest_garbage_is_a_store_error(inverse_store, content, message):
    folder, target, _ = inverse_store
    (folder / "manifest.json").write_bytes(content)
    with pytest.raises(StoreError, match=message) as info:
        load_inverse(folder, target)
    assert "manifest.json" in str(info.value) and "delete the folder" in str(info.value)


def test_manifest_of_a_twin_store_is_refused(tmp_path, inverse_store):
    """Two stores of the same inverse class with byte-identical fitted tensors but another
    damping: the manifest of one beside the tensors of the other is refused (store ids)."""
    folder, target, inverse = inverse_store
    twin = ik.Exact(damping=3e-3).fit(ik.Curvature(target, classification_data(), "ggn"))
    save_inverse(tmp_path / "twin", twin)
    assert all(torch.equal(twin.state_dict()[k], v) for k, v in inverse.state_dict().items())
    (folder / "manifest.json").write_bytes((tmp_path / "twin" / "manifest.json").read_bytes())
    with pytest.raises(StoreError, match="tensors.safetensors does not match the checksum"):
        load_inverse(folder, target)


def test_store_round_trip_and_reserved_names(tmp_path):
    save_tensors(tmp_path / "s", {"a": torch.arange(3.0)}, {"note": "hi", "n": 3})
    tensors, manifest = load_tensors(tmp_path / "s")
    assert torch.equal(tensors["a"], torch.arange(3.0)) and manifest["note"] == "hi"
    with pytest.raises(StoreError, match="reserved"):
        save_tensors(tmp_path / "t", {}, {"checksum": 1})
    with pytest.raises(StoreError, match="tensors only"):
        save_tensors(tmp_path / "t", {"a": [1, 2]}, {})


def test_old_format_store_is_refused(inverse_store):
    folder, target, _ = inverse_store
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("checksum")
    manifest["format_version"] = 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="older influencekit"):
        load_inverse(folder, target)


def test_no_temporary_files_are_left(tmp_path, inverse_store):
    folder, _, _ = inverse_store
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "tensors.safetensors"]
    atomic_write(tmp_path / "f.bin", b"one")
    atomic_write(tmp_path / "f.bin", b"two")
    assert (tmp_path / "f.bin").read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# -- names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../x", "/etc/passwd", "a\\b", "a\x00b",
                                  3])
def test_names_cannot_leave_the_folder(tmp_path, name):
    with pytest.raises(StoreError, match="plain|string"):
        safe_path(tmp_path, name)


def test_plain_names_are_kept(tmp_path):
    assert safe_path(tmp_path, "part-0.npy") == tmp_path / "part-0.npy"
    assert safe_path(tmp_path, "..hidden") == tmp_path / "..hidden"


# -- results arrays -------------------------------------------------------------------------------
def _filled(folder, rows=12, cols=3, config=None):
    array = ResultsArray.open(folder, (rows, cols), "float64", config or {"run": 1})
    values = np.arange(rows * cols, dtype=np.float64).reshape(rows, cols) + 1.0
    for r in range(rows):
        array.write(r, values[r])
    return array, values


def test_results_round_trip(tmp_path):
    array, values = _filled(tmp_path / "r")
    assert array.complete and array.pending() == []
    np.testing.assert_array_equal(ResultsArray.read(tmp_path / "r").values(), values)
    np.testing.assert_array_equal(np.load(tmp_path / "r" / "values.npy"), values)  # plain .npy


def test_half_truncated_values_are_refused(tmp_path):
    """The issue's case: values.npy cut to half returned zeros for 6 of 12 rows."""
    _filled(tmp_path / "r")
    path = tmp_path / "r" / "values.npy"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    for load in (lambda: ResultsArray.read(tmp_path / "r").values(),
                 lambda: ResultsArray.open(tmp_path / "r", (12, 3), config={"run": 1})):
        with pytest.raises(StoreError, match="values.npy is truncated"):
            load()


def test_bit_flip_in_a_row_names_the_row(tmp_path):
    array, _ = _filled(tmp_path / "r")
    path = tmp_path / "r" / "values.npy"
    data = bytearray(path.read_bytes())
    offset = array.meta["files"]["values.npy"]["offset"]
    data[offset + 5 * 24 + 3] ^= 0x10  # row 5 (3 float64 per row)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"rows 5\)"):
        ResultsArray.read(tmp_path / "r").values()


def test_corrupt_rows_can_be_discarded_and_recomputed(tmp_path):
    array, values = _filled(tmp_path / "r")
    path = tmp_path / "r" / "values.npy"
    data = bytearray(path.read_bytes())
    data[array.meta["files"]["values.npy"]["offset"] + 2 * 24] ^= 0x01  # row 2
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="rows 2"):
        reopened = ResultsArray.open(tmp_path / "r", (12, 3), config={"run": 1},
                                     discard_corrupt=True)
    assert reopened.pending() == [2]
    reopened.write(2, values[2])
    np.testing.assert_array_equal(ResultsArray.read(tmp_path / "r").values(), values)


@pytest.mark.parametrize("name", ["values.npy", "checksums.npy"])
def test_appended_bytes_and_swapped_files_are_refused(tmp_path, name):
    _filled(tmp_path / "a")
    _filled(tmp_path / "b")  # same shape, same values, but another store
    path = tmp_path / "a" / name
    original = path.read_bytes()
    path.write_bytes(original + b"\x00")
    with pytest.raises(StoreError, match="1 bytes appended"):
        ResultsArray.read(tmp_path / "a")
    path.write_bytes((tmp_path / "b" / name).read_bytes())
    if name == "checksums.npy":  # the records of another store do not match these rows
        with pytest.raises(StoreError, match="do not match their checksums"):
            ResultsArray.read(tmp_path / "a")


def test_deleted_meta_is_refused_not_recreated(tmp_path):
    _filled(tmp_path / "r")
    (tmp_path / "r" / "meta.json").unlink()
    with pytest.raises(StoreError, match="holds files but no meta.json"):
        ResultsArray.open(tmp_path / "r", (12, 3), config={"run": 1})
    assert (tmp_path / "r" / "values.npy").exists()  # nothing was overwritten


def test_npy_header_edit_is_refused(tmp_path):
    _filled(tmp_path / "r")
    path = tmp_path / "r" / "values.npy"
    data = path.read_bytes()
    path.write_bytes(data.replace(b"'fortran_order': False", b"'fortran_order': True ", 1))
    with pytest.raises(StoreError, match="header of .*values.npy was modified"):
        ResultsArray.read(tmp_path / "r")


def test_two_handles_on_interleaved_rows(tmp_path):
    """Two writers of one store (here two handles; two processes in test_faults.py) writing
    alternate rows, all of which share one page of each file."""
    a = ResultsArray.open(tmp_path / "r", (8, 2), config={})
    b = ResultsArray.open(tmp_path / "r", (8, 2), config={})
    for r in range(8):
        (a if r % 2 else b).write(r, [r, -r])
    np.testing.assert_array_equal(ResultsArray.read(tmp_path / "r").values(),
                                  [[r, -r] for r in range(8)])


def test_bad_rows_and_shapes_are_store_errors(tmp_path):
    array = ResultsArray.open(tmp_path / "r", (3, 2), config={})
    with pytest.raises(StoreError, match="outside"):
        array.write(3, [1.0, 2.0])
    with pytest.raises(StoreError, match="shape"):
        array.write(0, [1.0, 2.0, 3.0])
    with pytest.raises(StoreError, match="read-only"):
        ResultsArray.read(tmp_path / "r").write(0, [1.0, 2.0])
    with pytest.raises(StoreError, match="positive sizes"):
        ResultsArray.open(tmp_path / "z", (0, 2))


# -- data fingerprints ----------------------------------------------------------------------------
class _Pairs(Dataset):
    """A map-style data set of (x, y) pairs as numpy / Python values."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class _Dicts(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"labels": self.y[i], "features": self.x[i]}


def test_fingerprint_is_the_same_for_every_container():
    x, y = classification_data(n=10)
    expected = data_fingerprint((x, y))
    assert data_fingerprint(TensorDataset(x, y)) == expected
    assert data_fingerprint(DataLoader(TensorDataset(x, y), batch_size=3)) == expected
    assert data_fingerprint(_Pairs(x, y)) == expected
    assert data_fingerprint(_Pairs(x.numpy(), y.numpy())) == expected
    # dict examples: keys are part of the fingerprint, their order is not
    assert data_fingerprint(_Dicts(x, y)) == data_fingerprint(DataLoader(_Dicts(x, y),
                                                                          batch_size=4))


def test_fingerprint_sees_values_labels_order_and_dtype():
    x, y = classification_data(n=10)
    base = data_fingerprint((x, y))
    y2 = y.clone()
    y2[3] = (y2[3] + 1) % 3
    x2 = x.clone()
    x2[7, 1] += 1e-12
    order = torch.arange(10).flip(0)
    changed = [(x, y2), (x2, y), (x[order], y[order]), (x.float(), y), (x[:9], y[:9]), (x,)]
    assert len({base, *(data_fingerprint(d) for d in changed)}) == len(changed) + 1


def test_fingerprint_of_unhashable_examples_is_a_clear_error():
    with pytest.raises(InfluenceKitError, match="cannot hash a object"):
        data_fingerprint(_Pairs([object()], [1]))
    with pytest.raises(InfluenceKitError, match="tuple of tensors, a Dataset"):
        data_fingerprint(42)


# -- subset retraining records its data ----------------------------------------------------------
def test_subset_store_refuses_other_data(tmp_path):
    target, train, query, masks, retrainer = workers.subset_problem(3)
    store = tmp_path / "lds"
    first = ik.response.subset_retraining(target, train, masks, query, retrainer, store=store)
    x, y = train
    y_flipped = y.clone()
    y_flipped[0] = 1 - y_flipped[0]
    with pytest.raises(StoreError, match="training_data: stored"):
        ik.response.subset_retraining(target, (x, y_flipped), masks, query, retrainer,
                                      store=store)
    qx, qy = query
    with pytest.raises(StoreError, match="query_data: stored"):
        ik.response.subset_retraining(target, train, masks, (qx + 1e-9, qy), retrainer,
                                      store=store)
    # the same data in another container is the same data: the stored rows come back
    again = ik.response.subset_retraining(target, TensorDataset(x, y), masks,
                                          DataLoader(TensorDataset(qx, qy), batch_size=4),
                                          retrainer, store=store)
    np.testing.assert_array_equal(again, first)


def test_subset_rows_compute_one_partition(tmp_path):
    target, train, query, masks, retrainer = workers.subset_problem(4)
    store = tmp_path / "lds"
    part = ik.response.subset_retraining(target, train, masks, query, retrainer, store=store,
                                         rows=[1, 3])
    full = ik.response.subset_retraining(target, train, masks, query, retrainer)
    np.testing.assert_array_equal(part[[1, 3]], full[[1, 3]])
    assert not part[[0, 2]].any()
    assert ResultsArray.read(store).pending() == [0, 2]
    with pytest.raises(ValueError, match="outside"):
        ik.response.subset_retraining(target, train, masks, query, retrainer, store=store,
                                      rows=[4])
