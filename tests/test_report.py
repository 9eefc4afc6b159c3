"""The HTML report opened in headless Chromium: the rendered DOM shows each query's top
training images (decoded at their true size) and the token heat maps of text data."""

import math
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from influencekit.cli.main import main
from influencekit.report import RunStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian package `chromium`; "
                             "`make test` installs it where apt-get is usable)")

TINY_DIGITS = """
[model]
factory = "influencekit.examples.digits:model"
args = { hidden = 6, epochs = 60, l2_strength = 1e-3 }
[data]
factory = "influencekit.examples.digits:data"
args = { n_train = 120 }
select = "misclassified"
max_queries = 2
[target]
l2_strength = 1e-3
[method]
name = "Exact"
damping = 1e-2
[report]
top = 3
"""

TEXT = """
[model]
factory = "tests.cli_text_example:model"
[data]
factory = "tests.cli_text_example:data"
[target]
l2_strength = 0.1
[method]
name = "Exact"
damping = 1e-3
[report]
top = 2
"""


def rendered_dom(page) -> str:
    """The DOM after Chromium loaded the page and ran its scripts."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class Elements(HTMLParser):
    """Every element as (tag, attributes, text directly inside it), plus its open sections."""

    def __init__(self):
        super().__init__()
        self.elements, self.stack = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        attrs["_within"] = [e[1].get("id") for e in self.stack if e[1].get("id")]
        attrs["_classes"] = [c for e in self.stack for c in e[1].get("class", "").split()]
        element = [tag, attrs, ""]
        self.elements.append(element)
        if tag not in ("img", "br", "input", "meta"):
            self.stack.append(element)

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2] += data


def parse(dom: str):
    parser = Elements()
    parser.feed(dom)
    return parser.elements


def by_class(elements, tag, cls):
    return [e for e in elements if e[0] == tag and cls in e[1].get("class", "").split()]


@needs_chromium
def test_report_dom_shows_each_querys_top_training_images(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_DIGITS)
    store = tmp_path / "store"
    trust = ["eval", "--trust", "--set", 'eval.trust_include=["convexity", "numeric stability"]']
    for argv in (["fit", str(config)], ["score"], trust):
        assert main([*argv, "--store", str(store), "--quiet"]) == 0
    assert main(["report", str(store), "--quiet"]) == 0
    elements = parse(rendered_dom(store / "report" / "index.html"))
    tensors, manifest = RunStore(store).read("scores")
    for q, name in enumerate(manifest["query_ids"]):
        heading = next(e for e in elements if e[0] == "h3" and f"q{q}" in e[1]["_within"])
        assert heading[2].strip() == name  # the name the terminal prints
        for kind in ("helpful", "harmful"):
            cards = [e for e in by_class(elements, "div", "card")
                     if kind in e[1]["class"] and f"q{q}" in e[1]["_within"]]
            assert [int(c[1]["data-train"]) for c in cards] == \
                tensors[f"{kind}_index"][q, :3].tolist()
            images = [e for e in by_class(elements, "img", "train-image")
                      if f"q{q}" in e[1]["_within"] and kind in e[1]["_classes"]]
            assert len(images) == 3
            # Chromium decoded each PNG: 8x8 digits are 8 pixels wide
            assert all(img[1]["data-width"] == "8" for img in images)
        query_image = next(e for e in by_class(elements, "img", "query-image")
                           if f"q{q}" in e[1]["_within"])
        assert query_image[1]["data-width"] == "8"
    rows = [e for e in elements if e[0] == "tr" and "query-table" in e[1]["_within"]]
    assert len(rows) == 1 + len(manifest["query_ids"])
    assert any(e[0] == "section" and e[1].get("class") == "influencekit-trust"
               for e in elements)
    assert not by_class(elements, "img", "broken")
    context = RunStore(store).trust().context  # each check's estimate, made before it ran
    assert set(context["estimated_seconds"]) == set(context["seconds"]) == {
        "convexity", "numeric stability"}
    assert all(s > 0 for s in context["estimated_seconds"].values())


def _colour(style: str):
    match = re.search(r"rgba\((\d+),\s*(\d+),\s*(\d+),\s*([\d.]+)\)", style)
    return tuple(float(x) for x in match.groups())


@needs_chromium
def test_report_dom_shows_token_heat_maps_of_text(tmp_path):
    config = tmp_path / "text.toml"
    config.write_text(TEXT)
    store = RunStore(tmp_path / "store")
    assert main(["score", str(config), "--store", str(store.path), "--quiet"]) == 0
    # per-token scores as the language-model work writes them: for each shown (query, train)
    # pair, terms over the training tokens that add up to the pair's score; and per query token
    tensors, manifest = store.read("scores")
    examples = store.read("examples")[1]["display"]
    pairs, rows = [], []
    for q in range(manifest["n_query"]):
        for m in tensors["helpful_index"][q, :2].tolist():
            tokens = examples["train_tokens"][str(m)]
            weights = torch.tensor([(-1.0) ** t * (t + 1) for t in range(len(tokens))],
                                   dtype=torch.float64)
            pairs.append((q, m))
            rows.append(float(tensors["scores"][q, m]) * weights / weights.sum())
    width = max(len(r) for r in rows)
    tensors["token_pairs"] = torch.tensor(pairs)
    tensors["train_token_scores"] = torch.stack(
        [torch.cat([r, torch.full((width - len(r),), math.nan)]) for r in rows])
    q_width = max(len(t) for t in examples["query_tokens"])
    tensors["query_token_scores"] = torch.tensor(
        [[(t - 2.0) if t < len(tokens) else math.nan for t in range(q_width)]
         for tokens in examples["query_tokens"]])
    manifest["query_token_scores_meaning"] = "test values: token t gets t - 2"
    store.write("scores", tensors, {k: v for k, v in manifest.items()
                                    if k not in ("store_id", "tensors_sha256", "checksum",
                                                 "format_version", "kind")})
    assert main(["report", str(store.path), "--quiet"]) == 0
    elements = parse(rendered_dom(store.path / "report" / "index.html"))
    for q in range(manifest["n_query"]):
        spans = [e for e in by_class(elements, "span", "tok")
                 if f"q{q}" in e[1]["_within"] and "query-tokens" in e[1]["_classes"]]
        assert [s[2] for s in spans] == examples["query_tokens"][q]
        for t, span in enumerate(spans):
            assert float(span[1]["data-score"]) == t - 2.0
            if t != 2:
                r, g, _, alpha = _colour(span[1]["style"])
                assert (g > r) == (t > 2)  # green helpful, red harmful
                scale = max(abs(v - 2.0) for v in range(len(spans)))
                assert alpha == pytest.approx(0.85 * abs(t - 2.0) / scale, abs=1e-3)
        m = tensors["helpful_index"][q, 0].item()
        card = [e for e in by_class(elements, "span", "scored")
                if f"q{q}" in e[1]["_within"] and "train-tokens" in e[1]["_classes"]]
        first = [float(s[1]["data-score"]) for s in card][:len(examples["train_tokens"][str(m)])]
        assert sum(first) == pytest.approx(float(tensors["scores"][q, m]), rel=1e-9)
