"""The CLI verbs of large runs, through `main(argv)`: `score --partition I/N` into partial
stores and `merge` give the scores of the Python API (and refuse an incomplete set of
partitions); `plan` prints the table of `ik.plan` for the config's run."""

import re

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.cli.main import main
from influencekit.examples import digits
from influencekit.report import RunStore

TINY = """
[model]
factory = "influencekit.examples.digits:model"
args = { hidden = 6, epochs = 100, l2_strength = 1e-3 }

[data]
factory = "influencekit.examples.digits:data"
args = { n_train = 150 }
select = "misclassified"
max_queries = 3

[target]
l2_strength = 1e-3

[method]
name = "Exact"
damping = 1e-2

[runtime]
batch_size = 32
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_scale") / "tiny.toml"
    path.write_text(TINY)
    return path


def by_hand():
    """The tiny run with the Python API: (target, train, query)."""
    data = digits.data(n_train=150)
    model = digits.model(data.train, hidden=6, epochs=100, l2_strength=1e-3)
    x, y = data.query
    with torch.no_grad():
        wrong = (model(x).argmax(1) != y).nonzero()[:, 0][:3]
    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-3))
    return target, data.train, (x[wrong], y[wrong])


def test_partitions_then_merge_give_the_api_scores(config, tmp_path, capsys):
    store = tmp_path / "store"
    # partitions score with the store's fitted inverse: without one they are refused
    assert main(["score", str(config), "--store", str(store), "--partition", "0/3"]) == 2
    assert "holds no fitted inverse" in capsys.readouterr().err
    assert main(["fit", str(config), "--store", str(store), "--quiet"]) == 0
    for part in ("2/3", "0/3"):
        assert main(["score", "--store", str(store), "--partition", part, "--quiet"]) == 0
    assert main(["merge", str(store), "--quiet"]) == 2  # 1/3 is missing
    assert "partitions 1/3 are missing" in capsys.readouterr().err
    assert main(["score", "--store", str(store), "--partition", "1/3", "--quiet"]) == 0
    assert sorted(p.name for p in (store / "partitions").iterdir()) == \
        ["0-of-3", "1-of-3", "2-of-3"]
    assert main(["merge", str(store)]) == 0
    printed = capsys.readouterr().out
    assert "3 partitions" in printed and "helpful:" in printed

    target, train, query = by_hand()
    inverse = ik.Exact(damping=1e-2).fit(ik.Curvature(target, train, kind="ggn"))
    expected = ik.Influence(target, inverse).pairwise(query, train)
    tensors, manifest = RunStore(store).read("scores")
    torch.testing.assert_close(tensors["scores"], expected, rtol=1e-12, atol=1e-12)
    order = np.argsort(-expected.numpy(), axis=1, kind="stable")
    np.testing.assert_array_equal(tensors["helpful_index"].numpy(), order[:, :20])
    assert manifest["n_train"] == 150 and manifest["n"] == 150
    # a partition's partial store holds exactly its training examples' columns
    part = ik.storage.ScoreStore.load(store / "partitions" / "1-of-3")
    assert part.columns == range(50, 100)
    torch.testing.assert_close(part.scores(), expected[:, 50:100], rtol=1e-12, atol=1e-12)


def _memory_column(text: str) -> dict[str, str]:
    rows = re.findall(r"^\| (\w+) \| [^|]+ \| ([^|]+) \|", text, flags=re.M)
    return {name: memory.strip() for name, memory in rows if name != "stage"}


def test_plan_prints_the_planner_table_of_the_config(config, capsys):
    budget = 2 * 1024**3
    assert main(["plan", str(config), "--method", "EKFAC", "--n-train", "200000",
                 "--n-query", "400", "--memory-gb", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    target, train, _ = by_hand()
    sample = tuple(t[:64] for t in train)
    plan = ik.plan(target, sample, method="ekfac", n_train=200000, n_query=400,
                   memory_budget=budget)
    # memory estimates and suggestions follow from the model's shapes and the budget alone
    # (times come from each run's own calibration)
    assert _memory_column(printed) == _memory_column(str(plan))
    assert set(_memory_column(printed)) == set(ik.planner.STAGES)
    expected = f"batch_size={plan.batch_size} query_block_size={plan.query_block_size}"
    assert expected in printed
    assert main(["plan", str(config), "--method", "CG", "--quiet"]) == 2
    assert "Exact, KFAC or EKFAC" in capsys.readouterr().err
