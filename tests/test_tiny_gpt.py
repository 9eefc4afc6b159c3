"""The shipped tiny-GPT config (King James verses, character level) end to end through the CLI on
a very small setting: the scores equal the flat path's, the per-token scores add up to them,
padding gets no token, and the report's DOM shows the token heat maps."""

import math

import pytest
import torch

import influencekit as ik
from influencekit.cli import build_run
from influencekit.cli.main import main
from influencekit.data import kjv_available
from influencekit.report import RunStore

from .test_report import CHROMIUM, by_class, parse, rendered_dom

pytest.importorskip("transformers", reason="transformers is not installed (make test installs it)")
pytestmark = pytest.mark.skipif(
    not kjv_available(), reason="the King James Bible is not installed (apt-get install -y "
    "bible-kjv-text bible-kjv; `make test` installs it where apt-get is usable)")

SMALL = ["--set", "model.args.steps=20", "--set", "model.args.n_embd=8",
         "--set", "data.args.n_train=24", "--set", "data.args.n_query=2",
         "--set", "data.args.length=24", "--set", "runtime.dtype=float64",
         "--set", "report.top=2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gpt") / "store"
    assert main(["fit", "tiny_gpt", "--store", str(path), "--quiet", *SMALL]) == 0
    assert main(["score", "--store", str(path), "--quiet"]) == 0
    assert main(["report", str(path), "--quiet"]) == 0
    return RunStore(path)


def test_cli_scores_equal_the_flat_path(store):
    tensors, manifest = store.read("scores")
    run = build_run(store.config(), progress=False)
    inverse = ik.storage.load_inverse(store.path / "inverse", run.target)
    flat = ik.Influence(run.target, inverse, path="flat").pairwise(run.query, run.train,
                                                                   run.runtime)
    assert tensors["scores"].shape == (2, 24)
    torch.testing.assert_close(tensors["scores"], flat, rtol=1e-8, atol=1e-8)
    # queries are verses, not the training verses
    assert not set(manifest["query_ids"]) & set(manifest["train_ids"])


def test_token_scores_add_up_to_the_pair_scores_and_skip_padding(store):
    tensors, manifest = store.read("scores")
    display = store.read("examples")[1]["display"]
    pairs = tensors["token_pairs"].tolist()
    shown = {(q, m) for q in range(2) for kind in ("helpful", "harmful")
             for m in tensors[f"{kind}_index"][q, :2].tolist()}
    assert set(map(tuple, pairs)) == shown
    for row, (q, m) in enumerate(pairs):
        values = tensors["train_token_scores"][row]
        length = len(display["train_tokens"][str(m)])
        assert length <= 24
        assert torch.isfinite(values[:length]).all() and torch.isnan(values[length:]).all()
        assert float(tensors["train_token_rest"][row]) == pytest.approx(0.0, abs=1e-9)
        total = float(values[:length].sum() + tensors["train_token_rest"][row])
        assert total == pytest.approx(float(tensors["scores"][q, m]), rel=1e-7, abs=1e-9)
    # per query token: the best training verse's score split over the query's tokens
    for q in range(2):
        m = int(tensors["helpful_index"][q, 0])
        values = tensors["query_token_scores"][q]
        length = len(display["query_tokens"][q])
        assert float(values[0]) == 0.0  # nothing predicts the first token
        assert float(values[:length].sum()) == pytest.approx(float(tensors["scores"][q, m]),
                                                             rel=1e-7)
    assert "most helpful" in manifest["query_token_scores_meaning"]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian "
                    "package `chromium`; `make test` installs it where apt-get is usable)")
def test_report_dom_shows_the_token_heat_maps(store):
    tensors, manifest = store.read("scores")
    display = store.read("examples")[1]["display"]
    elements = parse(rendered_dom(store.path / "report" / "index.html"))
    for q in range(2):
        spans = [e for e in by_class(elements, "span", "tok")
                 if f"q{q}" in e[1]["_within"] and "query-tokens" in e[1]["_classes"]]
        assert [s[2] for s in spans] == display["query_tokens"][q]
        for kind in ("helpful", "harmful"):
            cards = [e for e in by_class(elements, "div", "card")
                     if kind in e[1]["class"] and f"q{q}" in e[1]["_within"]]
            assert [int(c[1]["data-train"]) for c in cards] == \
                tensors[f"{kind}_index"][q, :2].tolist()
        m = int(tensors["helpful_index"][q, 0])
        tokens = [e for e in by_class(elements, "span", "tok")
                  if f"q{q}" in e[1]["_within"] and "train-tokens" in e[1]["_classes"]]
        first = tokens[:len(display["train_tokens"][str(m)])]
        assert [t[2] for t in first] == display["train_tokens"][str(m)]
        scored = [float(t[1]["data-score"]) for t in first if "data-score" in t[1]]
        assert len(scored) == len(first)  # every character of the verse is coloured
        assert math.fsum(scored) == pytest.approx(float(tensors["scores"][q, m]), rel=1e-6)
