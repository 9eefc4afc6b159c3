"""ScoreStore integrity: every file checksummed or size-checked and verified on read, blocks
verified against their own records, corrupt blocks discarded and recomputed bit-identically,
writers of different blocks never corrupting each other, and the old unchecksummed format
refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.errors import StoreError
from influencekit.storage import ScoreStore
from influencekit.testing import workers

F64 = torch.float64


@pytest.fixture(scope="module")
def problem():
    return workers.score_problem(30)


def _stream(problem, folder, **kwargs):
    influence, train, query = problem
    return ik.stream_scores(influence, query, train, store=folder, block_size=6,
                            store_dtype="float64", runtime=ik.Runtime(progress=False), **kwargs)


def _flip(path, byte):
    data = bytearray(path.read_bytes())
    data[byte] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_one_block_is_refused_then_recomputed(tmp_path, problem):
    folder = tmp_path / "s"
    reference = _stream(problem, folder).store.scores()
    store = ScoreStore.load(folder)
    offset = store.layout["files"]["scores.npy"]["offset"]
    # the score of query 1, training example 14 lies in block (0, 2) (columns 12..17)
    _flip(folder / "scores.npy", offset + (1 * 30 + 14) * 8 + 3)
    with pytest.raises(StoreError, match=r"1 done block\(s\) .* \(blocks \(0, 2\)\)"):
        ScoreStore.load(folder).scores()
    # blocks that do not touch it still read
    assert torch.equal(ScoreStore.load(folder).read(cols=range(0, 12)), reference[:, :12])
    with pytest.warns(UserWarning, match="marked not done"):
        assert ScoreStore.load(folder).verify(discard_corrupt=True) == [(0, 2)]
    again = _stream(problem, folder)
    assert again.blocks_computed == 1
    assert again.store.scores().numpy().tobytes() == reference.numpy().tobytes()


def test_every_file_is_checked_on_load(tmp_path, problem):
    folder = tmp_path / "s"
    _stream(problem, folder)
    for name, change, message in (
            ("scores.npy", lambda d: d[:-8], "truncated"),
            ("checksums.npy", lambda d: d + b"\0", "longer than written"),
            ("scores.npy", lambda d: d[:10] + bytes([d[10] ^ 1]) + d[11:], "header"),
    ):
        path = folder / name
        original = path.read_bytes()
        path.write_bytes(change(original))
        with pytest.raises(StoreError, match=f"{name}.*{message}|{message}.*{name}"):
            ScoreStore.load(folder)
        path.write_bytes(original)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["config"]["inverse"]["damping"] = 0.03  # an edit that is still valid JSON
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="does not match its own checksum"):
        ScoreStore.load(folder)


def test_the_old_format_without_checksums_is_refused(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"kind": "scores", "format": 1}))
    with pytest.raises(StoreError, match="no 'checksum' entry"):
        ScoreStore.load(folder)


def test_blocks_are_committed_after_their_bytes_and_overwrites_undo_first(tmp_path):
    store = ScoreStore.open(tmp_path / "s", n_query=2, n_train=4, block_shape=(2, 2),
                            dtype="float64", commit_seconds=3600)
    store.write_block(0, 0, torch.ones(2, 2, dtype=F64))
    on_disk = ScoreStore.load(tmp_path / "s", writable=False)
    assert store.is_done(0, 0) and not on_disk.is_done(0, 0)
    store.commit()
    assert on_disk.is_done(0, 0)
    store.write_block(0, 0, torch.full((2, 2), 2.0, dtype=F64))  # overwrite: undone at once
    assert not on_disk.is_done(0, 0) and store.is_done(0, 0)
    assert torch.equal(on_disk.read_block(0, 0), torch.zeros(2, 2, dtype=F64))
    store.commit()
    assert torch.equal(on_disk.read_block(0, 0), torch.full((2, 2), 2.0, dtype=F64))
    with pytest.raises(StoreError, match="read-only"):
        on_disk.write_block(0, 1, torch.zeros(2, 2, dtype=F64))
    with pytest.raises(StoreError, match="outside the grid"):
        store.write_block(0, 2, torch.zeros(2, 2, dtype=F64))


def test_two_writers_of_one_store_interleaved(tmp_path):
    """Two handles on one store (two processes in the fault tests) writing neighbouring blocks
    of the same rows, committed in an interleaved order: both blocks verify."""
    kwargs = dict(n_query=3, n_train=5, block_shape=(3, 1), dtype="float32")
    a = ScoreStore.open(tmp_path / "s", commit_seconds=3600, **kwargs)
    b = ScoreStore.open(tmp_path / "s", commit_seconds=3600, **kwargs)
    values = torch.arange(15, dtype=torch.float32).reshape(3, 5)
    for ti in range(5):
        (a if ti % 2 else b).write_block(0, ti, values[:, ti:ti + 1])
    a.commit()
    b.commit()
    reader = ScoreStore.load(tmp_path / "s", writable=False)
    assert reader.complete and torch.equal(reader.scores(), values)
    assert reader.verify() == []
    assert ScoreStore.blocks_done(tmp_path / "s") == 5


def test_a_folder_with_files_but_no_manifest_is_not_taken(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "scores.npy").write_bytes(np.zeros(3).tobytes())
    with pytest.raises(StoreError, match="holds files but no manifest.json"):
        ScoreStore.open(folder, n_query=1, n_train=3, block_shape=(1, 1))
