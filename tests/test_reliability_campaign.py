"""The corruption campaign of benchmarks/reliability.py: every stored file type (inverse stores,
results arrays, score stores, fit stores, gradient stores, the CLI's run store) x every kind of
corruption; no load may return different content,
and every refusal is an InfluenceKitError that names the corrupted file. Reduced (4 bit
positions per file) in the default suite, the full 40 positions in the slow suite."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).parents[1] / "benchmarks" / "reliability.py"


def _campaign():
    spec = importlib.util.spec_from_file_location("reliability_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _check(rows, positions):
    module = _campaign()
    files = {("inverse Exact", "manifest.json"), ("inverse Exact", "tensors.safetensors"),
             ("inverse EKFAC", "manifest.json"), ("inverse EKFAC", "tensors.safetensors")}
    files |= {(store, name) for store in ("subset_retraining (resume)", "ResultsArray.read")
              for name in ("meta.json", "values.npy", "checksums.npy")}
    files |= {(store, name) for store in ("ScoreStore.load().scores()",
                                          "stream_scores (resume, top-k)",
                                          "merge_score_stores (partition 0/2)")
              for name in ("manifest.json", "scores.npy", "checksums.npy")}
    results = ("meta.json", "values.npy", "checksums.npy")
    files |= {("EKFAC.fit(store=) (resume)", f"{part}/{name}")
              for part in ("factors", "corrections") for name in results}
    files |= {("Exact.fit(store=) (resume)", f"dense/{name}") for name in results}
    files |= {(store, f"gradients/{name}") for store in ("GradientStore.load (every row)",
                                                         "build_gradient_store (resume)")
              for name in results}
    files |= {("RunStore (as the report reads it)", name) for name in module.RUN_STORE_FILES}
    assert {(r["store"], r["file"]) for r in rows} == files
    assert {(r["store"], r["file"], r["kind"]) for r in rows} == {
        (*f, kind) for f in files for kind in module.KINDS}
    for r in rows:
        where = (r["store"], r["file"], r["kind"], r["examples"])
        assert r["silent"] == 0 and r["other"] == 0, where
        assert r["named"] == r["refused"], where
        assert r["refused"] + r["same"] == r["trials"], where
        if r["kind"] != "bitflip":  # a flip may leave a number the same (1e-3 -> 1E-3)
            assert r["refused"] == r["trials"], where
    flips = [r["trials"] for r in rows if r["kind"] == "bitflip"]
    assert min(flips) == positions


def test_reduced_corruption_campaign(tmp_path):
    _check(_campaign().run_corruptions(positions=4, root=tmp_path), 4)


@pytest.mark.slow
def test_full_corruption_campaign(tmp_path):
    _check(_campaign().run_corruptions(positions=40, root=tmp_path), 40)
