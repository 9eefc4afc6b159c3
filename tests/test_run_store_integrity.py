"""The CLI's run store (influencekit.report.RunStore): every JSON file carries its own checksum
and the store's run_store_id, the extra figures' PNGs are checked against their sha256, and a
part that run.json lists is never read as "never written" once deleted. Each refusal is a
StoreError naming the file. (The full corruption campaign over these files is in
test_reliability_campaign.py.)"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from influencekit.cli.config import load_config
from influencekit.diagnostics import Finding, TrustReport
from influencekit.errors import StoreError
from influencekit.report import RunStore

CONFIG = {"method": {"name": "Exact", "damping": 0.001}, "data": {"name": "digits"}}


def _store(folder, damping=0.001) -> RunStore:
    store = RunStore(folder)
    store.write_config({**CONFIG, "method": {"name": "Exact", "damping": damping}})
    scores = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    store.write("scores", {"scores": scores}, {"n_query": 3, "n_train": 4})
    store.write_trust(TrustReport([Finding("convexity", "negative curvature mass", 0.02,
                                           "pass", "pass <= 0.05")]))
    store.figure_path("extra.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(40)))
    store.add_figure("extra.png", "A figure", "its caption")
    store.record_command("score", {"score": 0.5}, {"n_train": 4})
    return store


def _edit_json(path, change) -> None:
    """Change a JSON file's content and leave it valid JSON (its checksum entry untouched)."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def test_files_round_trip_with_checksums_and_one_store_id(tmp_path):
    store = _store(tmp_path)
    assert store.config() == CONFIG
    assert load_config(tmp_path) == CONFIG  # the CLI's path: verified, id dropped
    assert load_config(tmp_path / "config.json") == CONFIG
    ids = set()
    for name in ("config.json", "run.json", "trust.json", "figures/figures.json"):
        data = json.loads((tmp_path / name).read_text())
        assert len(data["checksum"]) == 64
        ids.add(data["run_store_id"])
    assert len(ids) == 1
    record = store.run_record()
    assert record["parts"] == ["scores", "trust.json", "figures/figures.json"]
    assert record["commands"]["score"]["timings"] == {"score": 0.5}
    assert store.trust().findings[0].value == 0.02
    png = (tmp_path / "figures" / "extra.png").read_bytes()
    assert store.figures() == [{"file": "extra.png", "title": "A figure",
                                "caption": "its caption",
                                "sha256": hashlib.sha256(png).hexdigest()}]


@pytest.mark.parametrize("name, read", [
    ("config.json", lambda s: s.config()),
    ("run.json", lambda s: s.run_record()),
    ("trust.json", lambda s: s.trust()),
    ("figures/figures.json", lambda s: s.figures()),
])
def test_an_edited_json_file_is_refused_naming_it(tmp_path, name, read):
    store = _store(tmp_path)
    _edit_json(tmp_path / name, lambda d: d.update(extra=1))
    with pytest.raises(StoreError, match=rf"{name}.*does not match its own checksum"):
        read(store)


def test_an_edited_damping_in_config_is_refused_by_the_cli_too(tmp_path):
    _store(tmp_path)
    _edit_json(tmp_path / "config.json", lambda d: d["method"].update(damping=0.003))
    with pytest.raises(StoreError, match="config.json does not match its own checksum"):
        load_config(tmp_path)


def test_a_file_of_another_run_store_is_refused(tmp_path):
    """A twin's file has a valid checksum; the run_store_id tells it apart."""
    store, twin = _store(tmp_path / "a"), _store(tmp_path / "b", damping=0.003)
    for name, read in (("trust.json", RunStore.trust), ("run.json", RunStore.run_record),
                       ("figures/figures.json", RunStore.figures)):
        shutil.copyfile(twin.path / name, store.path / name)
        with pytest.raises(StoreError, match=rf"{name} and .*config.json belong to different "
                                             "run stores"):
            read(store)
    # a swapped config.json: every other file now disagrees with it
    fresh = _store(tmp_path / "c")
    shutil.copyfile(twin.path / "config.json", fresh.path / "config.json")
    with pytest.raises(StoreError, match="different run stores"):
        fresh.run_record()
    # a copy of a whole store is one store
    shutil.copytree(_store(tmp_path / "d").path, tmp_path / "copy")
    copy = RunStore(tmp_path / "copy")
    assert copy.config() == CONFIG and copy.run_record()["parts"] and copy.trust()


def test_deleted_parts_are_refused_not_read_as_absent(tmp_path):
    store = _store(tmp_path)
    (tmp_path / "trust.json").unlink()
    with pytest.raises(StoreError, match="trust.json is missing although .*run.json lists it"):
        store.trust()
    (tmp_path / "figures" / "figures.json").unlink()
    with pytest.raises(StoreError, match="figures.json is missing"):
        store.figures()
    (tmp_path / "scores" / "manifest.json").unlink()
    assert store.has("scores")  # the tensor file is left: read refuses
    with pytest.raises(StoreError, match="scores/manifest.json is missing"):
        store.read("scores")
    shutil.rmtree(tmp_path / "scores")
    with pytest.raises(StoreError, match="scores is missing although"):
        store.has("scores")
    (tmp_path / "run.json").unlink()
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "tensors.safetensors").write_bytes(b"x")
    with pytest.raises(StoreError, match="run.json is missing although the store holds"):
        store.run_record()


def test_parts_never_written_are_absent_without_error(tmp_path):
    store = RunStore(tmp_path)
    store.write_config(CONFIG)
    store.record_command("fit", {}, {})
    assert store.trust() is None and store.figures() == [] and not store.has("evaluation")
    assert store.run_record()["parts"] == []


def test_a_modified_or_missing_figure_is_refused(tmp_path):
    store = _store(tmp_path)
    png = tmp_path / "figures" / "extra.png"
    png.write_bytes(png.read_bytes()[:-1])
    with pytest.raises(StoreError, match="extra.png does not match the sha256"):
        store.figures()
    png.unlink()
    with pytest.raises(StoreError, match="extra.png, listed in .*figures.json, cannot be read"):
        store.figures()


def test_a_corrupt_run_record_is_replaced_by_the_next_command(tmp_path):
    store = _store(tmp_path)
    (tmp_path / "run.json").write_bytes(b"{\xff")
    with pytest.raises(StoreError, match="run.json is not UTF-8"):
        store.run_record()
    with pytest.warns(UserWarning, match="replaced by a new record"):
        store.record_command("eval", {"eval": 1.0}, {})
    assert set(store.run_record()["commands"]) == {"eval"}


def test_the_store_id_is_kept_by_later_commands_and_renewed_by_overwrite(tmp_path):
    store = _store(tmp_path)

    def store_id():
        return json.loads((tmp_path / "config.json").read_text())["run_store_id"]

    first = store_id()
    store.prepare({**CONFIG, "report": {"title": "x"}}, lambda c: c["method"])
    assert store_id() == first and store.trust() is not None
    store.prepare({**CONFIG, "method": {"name": "CG"}}, lambda c: c["method"], overwrite=True)
    assert store_id() != first and not (tmp_path / "trust.json").exists()


def test_a_config_without_checksum_is_refused_with_the_reason(tmp_path):
    _store(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))  # an older influencekit's file
    with pytest.raises(StoreError, match="no 'checksum' entry .*older influencekit"):
        RunStore(tmp_path).config()
    with pytest.raises(StoreError, match="older influencekit"):
        load_config(tmp_path)
