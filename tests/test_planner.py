"""The planner: estimates within 2x of measured time and memory (slow: it times real runs),
and its suggestions and warnings."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import influencekit as ik
from influencekit.errors import InfluenceKitError

from .helpers import classification_data, mlp

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                    reason="peak memory is measured through Linux /proc/self/clear_refs")
def test_estimates_within_2x_of_measured_time_and_memory():
    """One fresh process plans four small runs (dense, K-FAC, EK-FAC, streaming scores) from
    its own calibration, then runs the stages: best-of-2 time and peak resident growth."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": str(HERE.parent / "src")}
    out = subprocess.run([sys.executable, str(HERE / "scale_plan_measure.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    cases = json.loads(out.stdout)
    pairs = []  # (what, estimated, measured)
    for case in ("flat", "kfac", "ekfac"):
        est, got = cases[case]["estimate"], cases[case]["measured"]["fit+eigendecomposition"]
        pairs.append((f"{case} fit time", est["fit"][0] + est["eigendecomposition"][0], got[0]))
        pairs.append((f"{case} fit memory",
                      max(est["fit"][1], est["eigendecomposition"][1]), got[1]))
    est, got = cases["scoring"]["estimate"], cases["scoring"]["measured"]
    for stage in ("query_gradients", "train_gradients", "scoring"):
        pairs.append((f"{stage} time", est[stage][0], got[stage][0]))
    streamed = ("query_gradients", "train_gradients", "scoring")
    pairs.append(("stream_scores time", sum(est[s][0] for s in streamed),
                  got["stream_scores"][0]))
    pairs.append(("stream_scores memory", max(est[s][1] for s in streamed),
                  got["stream_scores"][1]))
    ratios = {what: e / m for what, e, m in pairs}
    assert all(0.5 <= r <= 2.0 for r in ratios.values()), ratios


@pytest.fixture(scope="module")
def small():
    model = mlp(d_in=8, hidden=16, d_out=4)
    target = ik.Target(model, ik.ClassificationTask())
    return target, classification_data(16, d_in=8, classes=4)


def test_plan_suggests_within_budget_and_warns_above_it(small, caplog):
    target, sample = small
    p = target.num_params
    roomy = ik.plan(target, sample, method="kfac", n_train=5000, n_query=100, k=10,
                    memory_budget=2**30)
    assert roomy.batch_size == 1024 and roomy.query_block_size == 100
    assert not roomy.warnings and roomy.store_bytes == 100 * 5000 * 4
    # a budget of a few batches of gradients: a smaller batch, and blocks of queries
    tight = 200 * p * 8 * 4
    with caplog.at_level(logging.WARNING, logger="influencekit"):
        cramped = ik.plan(target, sample, method="flat", n_train=5000, n_query=2000,
                          memory_budget=tight, calibration_repeats=1)
    assert cramped.batch_size < roomy.batch_size
    assert cramped.query_block_size < 2000
    assert cramped.stage("train_gradients").seconds > roomy.stage("train_gradients").seconds
    # the dense fit of [p, p] is over such a budget: warned, naming the stage
    over = [s.name for s in cramped.stages if s.memory_bytes > tight]
    assert over and all(f"stage {name!r}" in caplog.text for name in over)
    assert len(cramped.warnings) == len(over)


def test_plan_partitions_and_store_dtype(small):
    target, sample = small
    base = ik.plan(target, sample, n_train=3000, n_query=50, calibration_repeats=1)
    stages = sum(s.seconds for s in base.stages)  # partitions split the stages' time (the
    # one-time start-up of each job is not divided)
    split = ik.plan(target, sample, n_train=3000, n_query=50, calibration=base.calibration,
                    max_job_seconds=stages / 3.5, disk_budget=50 * 3000 * 3)
    assert split.total_seconds == base.total_seconds and split.partitions == 4
    assert split.store_dtype == "bfloat16" and base.store_dtype == "float32"
    assert "train_gradients" in str(base) and base.peak_memory_bytes > 0


def test_plan_argument_errors(small):
    target, sample = small
    with pytest.raises(InfluenceKitError, match="method='lissa'"):
        ik.plan(target, sample, method="lissa", n_train=10, n_query=1)
    with pytest.raises(InfluenceKitError, match="n_query must be at least 1"):
        ik.plan(target, sample, n_train=10, n_query=0)
    no_layers = ik.Target(Scale(), ik.RegressionTask())
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(InfluenceKitError, match="K-FAC needs Linear or Conv layers"):
        ik.plan(no_layers, (x, x), method="ekfac", n_train=10, n_query=1)


class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        return x * self.w
