"""``diagnostics.check`` on the digits MLP with its defaults plus checkpoints (issue 5).

    PYTHONPATH=src python benchmarks/trust_digits.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _digits import digits_splits, train_mlp  # noqa: E402

import influencekit as ik  # noqa: E402


def main():
    torch.set_num_threads(1)
    train, _, pool = digits_splits()
    target, checkpoints = train_mlp(train, checkpoints_every=20)
    t0 = time.time()
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, train, kind="ggn"))
    report = ik.diagnostics.check(
        target, inverse, train, (pool[0][:5], pool[1][:5]), checkpoints=checkpoints[:-1],
        training=ik.diagnostics.TrainingSetup(steps=64, lr=0.1, batch_size=64))
    print(report)
    print(f"{time.time() - t0:.0f}s (fit + check)")


if __name__ == "__main__":
    main()
