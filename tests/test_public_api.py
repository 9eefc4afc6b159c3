"""What the README promises is there: every ``ik.<name>`` it mentions resolves after
``import influencekit as ik``, every sub-package of its layout is an attribute of ``ik``, and its
"Use" block runs as written (on a small model) with the shapes it states."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import influencekit as ik

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def _resolve(dotted: str):
    value = ik
    for part in dotted.split(".")[1:]:
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("dotted", sorted(set(re.findall(r"\bik(?:\.[A-Za-z_]\w*)+", README))))
def test_every_name_in_the_readme_resolves(dotted):
    assert _resolve(dotted) is not None


def test_every_package_of_the_layout_is_an_attribute():
    layout = README[README.index("## Layout"):]
    packages = re.findall(r"`(\w+)/`", layout)
    assert len(packages) >= 14
    for name in packages:
        assert getattr(ik, name).__name__ == f"influencekit.{name}"


def test_the_readme_storage_names():
    """The storage bullet names save_inverse / load_inverse under ik.storage."""
    assert callable(ik.storage.save_inverse) and callable(ik.storage.load_inverse)
    assert callable(ik.storage.data_fingerprint) and ik.storage.ResultsArray


def _use_block() -> str:
    start = README.index("## Use")
    block = README[start:].split("```python\n", 1)[1].split("```", 1)[0]
    assert "ik.Influence" in block
    return block


def test_the_use_block_runs_as_written():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 5, (48,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    train, query = (x[:40], y[:40]), (x[40:], y[40:])
    # the model is trained first (the README's model is; the response curve re-optimises it)
    polish = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-3))
    ik.write_params(polish, ik.minimize(polish, train, grad_tol=1e-8).params)
    names = {"model": model, "train": train, "query": query, "query_x": x[40]}
    exec(compile("import influencekit as ik\n" + _use_block(), "README.md", "exec"), names)
    scores = names["scores"]
    assert scores.shape == (8, 40)                                 # [n_query, n_train]
    per_layer = names["per_layer"]
    torch.testing.assert_close(sum(per_layer.values()), scores)    # "sums to scores"
    assert names["dtheta"].shape == (40, sum(p.numel() for p in model.parameters()))
    assert names["self_inf"].shape == (40,) and bool((names["self_inf"] >= 0).all())
    assert names["trust"].verdict in ("pass", "warn", "fail", "skipped")
