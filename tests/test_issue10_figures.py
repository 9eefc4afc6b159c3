"""Slow: the figures of issue 10 in benchmarks/RESULTS.md ("Fixing mispredictions and fading on
fine-tuned transformers") hold.

- A small re-run: the Fashion-MNIST ResNet correction (influence over ALL conv layers, EK-FAC;
  the classifier fine-tuned, lr 0.03, k 32, ≤ 10 steps) on the first 20 test points, with the
  influence and random selectors: the fix rates and held-out changes the 100-point table reports,
  with the margin a 20-point sample needs.
- The committed JSON rows behind the tables and figures (benchmarks/*.jsonl): their settings
  (k ≤ 32, ≤ 10 steps, disjoint validation / test splits) and the numbers RESULTS.md quotes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BENCH = ROOT / "benchmarks"

pytestmark = pytest.mark.slow


def rows(name: str) -> list[dict]:
    path = BENCH / name
    if not path.exists():
        pytest.skip(f"{name} is not committed")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_selector(found: list[dict], **where) -> dict[str, dict]:
    chosen = [r for r in found if all(r[k] == v for k, v in where.items())]
    out = {r["selector"]: r for r in chosen}
    assert len(out) == len(chosen), f"duplicate rows for {where}"
    return out


def test_fashion_resnet_correction_rerun_on_20_test_points():
    sys.path.insert(0, str(BENCH))
    import _fashion

    if not _fashion.available():
        pytest.skip("Fashion-MNIST is not installed (see DATA.md)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(BENCH / "correction.py"), "--json", "--tasks", "fashion",
         "--split", "test", "--points", "20", "--lr", "0.03", "--k", "32", "--params", "head",
         "--selectors", "influence,random"],
        env=env, capture_output=True, text=True, timeout=3600, check=True)
    found = by_selector([json.loads(line) for line in out.stdout.splitlines()])
    influence, random = found["influence"], found["random"]
    assert influence["n_points"] == random["n_points"] == 20
    assert influence["task"] == "fashion-resnet-conv-ekfac"
    assert influence["fix_rate"] >= 0.8
    assert influence["fix_rate"] >= random["fix_rate"] + 0.3
    assert influence["heldout_acc_delta"] >= -1.0


def test_fashion_resnet_correction_rows():
    test = rows("correction_fashion_conv_test.jsonl")
    assert {r["split"] for r in test} == {"test"}
    assert all(r["k"] <= 32 and r["steps"] <= 10 for r in test)
    head = by_selector(test, k=32, params="head", lr=0.03)
    assert head["influence"]["n_points"] == 100
    assert head["influence"]["fix_rate"] >= 0.9
    assert head["influence"]["heldout_acc_delta"] >= -1.0
    assert head["random"]["fix_rate"] <= 0.4
    assert head["gradient_similarity"]["fix_rate"] <= head["influence"]["fix_rate"]
    val = rows("correction_fashion_conv_val.jsonl")
    assert {r["split"] for r in val} == {"val"}
    assert any(r["params"] == "head" and r["lr"] == 0.03 and r["fix_rate"] >= 0.8
               and r["heldout_acc_delta"] >= -1.0 for r in val)


def test_minilm_correction_rows():
    """MiniLM fine-tuned end to end, influence over its last two blocks: influence fixes far
    more than random, but the mean held-out change misses the −1 point goal."""
    test = rows("correction_minilm_ft_test.jsonl")
    assert {r["split"] for r in test} == {"test"}
    assert all(r["k"] <= 32 and r["steps"] <= 10 for r in test)
    found = by_selector(test, k=32, params="last2", lr=0.02)
    influence, random = found["influence"], found["random"]
    assert influence["task"] == "minilm-tweets-ekfac" and influence["n_points"] >= 30
    assert influence["fix_rate"] >= 0.9
    assert random["fix_rate"] <= 0.2
    assert influence["fix_rate"] - random["fix_rate"] >= 0.7
    assert -2.0 <= influence["heldout_acc_delta"] < -1.0
    val = rows("correction_minilm_ft_val.jsonl")
    assert {r["split"] for r in val} == {"val"}
    assert not any(r["fix_rate"] >= 0.8 and r["heldout_acc_delta"] >= -1.0 for r in val)


def curves(name: str) -> dict[int, dict[int, dict]]:
    """{horizon damped: {T: row}} of a divergence row file."""
    out: dict[int, dict[int, dict]] = {}
    for r in rows(name):
        out.setdefault(r["horizon_damped"], {})[r["T"]] = r
    return out


def test_minilm_divergence_fades():
    found = curves("divergence_minilm.jsonl")
    assert sorted(found) == [4, 32, 128]
    for by_t in found.values():
        assert sorted(by_t) == [1, 2, 4, 8, 16, 32, 64, 128]
        assert by_t[16]["pearson"] >= 0.85                       # best agreement
        assert max(by_t[t]["pearson"] for t in (64, 128)) <= 0.5   # faded
    # the matching horizon damping keeps the size of Δθ right; a short one does not
    assert all(r["theta_relative_error"] <= 1.5 for r in found[128].values())
    assert all(found[4][t]["theta_relative_error"] >= 3.0 for t in (16, 32, 64, 128))


def test_fashion_divergence_is_weak_at_every_horizon():
    found = curves("divergence_fashion.jsonl")
    assert sorted(found) == [4, 32, 512]
    for by_t in found.values():
        assert max(r["T"] for r in by_t.values()) == 512
        assert all(r["pearson"] <= 0.4 for r in by_t.values())
    assert all(r["theta_relative_error"] <= 1.6 for r in found[512].values())
    assert all(found[4][t]["theta_relative_error"] >= 15 for t in (4, 64, 512))
