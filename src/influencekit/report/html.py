"""The HTML report of a run store: one self-contained page (no network assets) with PNGs beside it.

``render_report(store)`` reads only the store (layout: :mod:`influencekit.report.store`,
``docs/store.md``) and writes ``<out>/index.html`` and ``<out>/img/*.png``:

- a summary (what was asked, the sign and scale of the scores), a table of contents;
- the settings (the resolved config), timings and versions;
- the trust report when ``eval`` ran the diagnostics, with how to read it;
- an index of every query (search box, columns sortable by score);
- training examples that recur in the top lists of several queries;
- per query: the query and its top helpful and harmful training examples as images
  (image data), feature values (tabular data) or text with a per-token heat map (text data),
  and the histogram of its scores;
- evaluation against retraining where computed: the response curve beside its tangent,
  leave-one-out and LDS scatter plots, removal curves; extra figures of the store.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

from .plots import (
    plot_histogram,
    plot_lds,
    plot_removal,
    plot_response,
    plot_scatter,
    save_image,
)
from .store import EVALUATION, EXAMPLES, FIGURES, REPORT, SCORES, RunStore

esc = html.escape


def top_examples(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k most helpful (largest s) and k most harmful (smallest s) per query."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k], order[:, ::-1][:, :k]


class _Page:
    """Everything read from the store, plus the output folder."""

    def __init__(self, store: RunStore, out: Path, top: int, max_queries: int):
        self.store, self.out = store, out
        self.config = store.config()
        self.record = store.run_record()
        self.scores, self.score_info = store.read(SCORES)
        self.examples, self.example_info = (store.read(EXAMPLES) if store.has(EXAMPLES)
                                            else ({}, {"display": {"kind": "none"}}))
        self.evaluation, self.evaluation_info = (store.read(EVALUATION) if store.has(EVALUATION)
                                                 else ({}, {}))
        self.trust = store.trust()
        self.top = min(top, self.scores["helpful_index"].shape[1])
        self.max_queries = max_queries
        self.query_ids = self.score_info["query_ids"]
        self.train_ids = self.score_info["train_ids"]
        self.display = self.example_info.get("display", {"kind": "none"})
        self.classes = self.example_info.get("classes")
        rows = self.examples.get("train_rows")
        self.train_row = {int(r): i for i, r in enumerate(rows.tolist())} if rows is not None \
            else {}
        self.token_pairs = {}
        if "token_pairs" in self.scores:
            for i, (q, m) in enumerate(self.scores["token_pairs"].tolist()):
                self.token_pairs[(q, m)] = i
        (out / "img").mkdir(parents=True, exist_ok=True)

    # -- labels ----------------------------------------------------------------------------
    def label_name(self, value) -> str:
        value = int(value)
        if self.classes and 0 <= value < len(self.classes):
            return self.classes[value]
        return str(value)

    def train_label(self, m: int) -> str | None:
        labels = self.examples.get("train_labels")
        return None if labels is None else self.label_name(labels[m])

    def query_label(self, q: int) -> tuple[str | None, str | None]:
        labels = self.examples.get("query_labels")
        if labels is None:
            return None, None
        return (self.label_name(labels[q]),
                self.label_name(self.examples["query_predictions"][q]))


def render_report(store: str | Path, out: str | Path | None = None, *, top: int | None = None,
                  max_queries: int | None = None) -> Path:
    """Write the report of ``store`` to ``out`` (default ``<store>/report``); return index.html.

    ``top`` (default the config's ``report.top``): helpful and harmful examples shown per
    query; ``max_queries`` (default ``report.max_queries``): queries shown with their examples
    (the index table lists every query)."""
    store = RunStore(store)
    config = store.config()
    out = Path(out) if out is not None else store.path / REPORT
    page = _Page(store, out, top or config["report"]["top"],
                 max_queries or config["report"]["max_queries"])
    sections = [
        ("summary", "Summary", _summary(page)),
        ("queries", "Queries", _query_index(page)),
        ("examples", "Each query's top examples", _query_sections(page)),
        ("recurring", "Training examples that recur", _recurring(page)),
        ("trust", "How far to trust these scores", _trust(page)),
        ("evaluation", "Checked against retraining", _evaluation(page)),
        ("figures", "More figures", _figures(page)),
        ("settings", "Settings, timings and versions", _settings(page)),
    ]
    sections = [s for s in sections if s[2]]
    toc = "".join(f'<li><a href="#{key}">{esc(title)}</a></li>' for key, title, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{esc(title)}</h2>{content}</section>'
                   for key, title, content in sections)
    title = config["report"]["title"] or "Which training examples drove these predictions?"
    index = out / "index.html"
    index.write_text(_PAGE.format(title=esc(title), toc=toc, body=body, style=_STYLE,
                                  script=_SCRIPT))
    return index


# -- summary ----------------------------------------------------------------------------------
def _summary(page: _Page) -> str:
    info, config = page.score_info, page.config
    facts = page.example_info.get("facts", {})
    method = config["method"]
    settings = ", ".join(f"{k} = {v}" for k, v in method.items() if k != "name")
    lines = [f"<p class='lead'>{esc(config['report']['notes'])}</p>"
             if config["report"]["notes"] else ""]
    lines.append(
        f"<p><b>{info['n_query']}</b> queries scored against <b>{info['n_train']}</b> training "
        f"examples with <b>{esc(method['name'])}</b> ({esc(settings)}) on the "
        f"<b>{esc(config['curvature']['kind'])}</b> curvature; {esc(info['measurement'])}.")
    if "query_accuracy" in facts:
        lines.append(f" The model's training accuracy is {facts['train_accuracy']:.3f}, its "
                     f"accuracy on the candidate queries {facts['query_accuracy']:.3f}; the "
                     f"queries shown are those selected by <code>data.select = "
                     f"\"{esc(config['data']['select'])}\"</code>.")
    lines.append("</p>")
    lines.append(f"<p class='convention'><b>Sign and scale.</b> {esc(info['meaning'])}</p>")
    if page.trust is not None:
        lines.append(f"<p>Trust report: <b class='verdict {page.trust.verdict}'>"
                     f"{esc(page.trust.verdict.upper())}</b> (<a href='#trust'>details</a>).</p>")
    return "".join(lines)


# -- index of queries ---------------------------------------------------------------------------
def _query_index(page: _Page) -> str:
    s = page.scores
    has_labels = "query_labels" in page.examples
    head = ["#", "query"] + (["label", "predicted"] if has_labels else []) + [
        "most helpful", "top s", "most harmful", "bottom s"]
    rows = []
    for q, name in enumerate(page.query_ids):
        h, hs = int(s["helpful_index"][q, 0]), float(s["helpful_score"][q, 0])
        b, bs = int(s["harmful_index"][q, 0]), float(s["harmful_score"][q, 0])
        link = (f"<a href='#q{q}'>{esc(name)}</a>" if q < page.max_queries else esc(name))
        cells = [f"<td data-v='{q}'>{q}</td>", f"<td>{_query_thumbnail(page, q)}{link}</td>"]
        if has_labels:
            label, predicted = page.query_label(q)
            cells += [f"<td>{esc(label)}</td>", f"<td>{esc(predicted)}</td>"]
        cells += [f"<td>{esc(page.train_ids[h])}</td>", f"<td data-v='{hs!r}'>{hs:+.4g}</td>",
                  f"<td>{esc(page.train_ids[b])}</td>", f"<td data-v='{bs!r}'>{bs:+.4g}</td>"]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    shown = min(page.max_queries, len(page.query_ids))
    note = (f"<p class='note'>The first {shown} queries have a section below; raise "
            "<code>--max-queries</code> to show more.</p>" if shown < len(page.query_ids)
            else "")
    header = "".join(f"<th data-col='{i}' title='click to sort'>{esc(h)}</th>"
                     for i, h in enumerate(head))
    return ("<p><input id='query-search' type='search' placeholder='search queries, labels, "
            "training examples...' aria-label='search queries'> <span class='note'>click a "
            "column header to sort</span></p>"
            f"<table id='query-table' class='sortable'><thead><tr>{header}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{note}")


# -- recurring training examples ------------------------------------------------------------------
def _recurring(page: _Page) -> str:
    helpful, harmful = defaultdict(list), defaultdict(list)
    for q in range(len(page.query_ids)):
        for m in page.scores["helpful_index"][q, :page.top].tolist():
            helpful[m].append(q)
        for m in page.scores["harmful_index"][q, :page.top].tolist():
            harmful[m].append(q)
    counts = {m: len(helpful[m]) + len(harmful[m]) for m in set(helpful) | set(harmful)}
    recurring = sorted((m for m, c in counts.items() if c >= 2), key=lambda m: (-counts[m], m))
    if not recurring:
        return (f"<p>No training example is among the top {page.top} helpful or harmful of "
                "two or more queries.</p>")
    rows = []
    shown = 15

    def names(qs):
        if not qs:
            return ""
        links = ", ".join(f"<a href='#q{q}'>{esc(page.query_ids[q])}</a>"
                          if q < page.max_queries else esc(page.query_ids[q]) for q in qs)
        return f"<b>{len(qs)}</b>: {links}"

    for m in recurring[:shown]:
        label = page.train_label(m)
        rows.append(
            f"<tr><td>{_thumbnail(page, m)}{esc(page.train_ids[m])}</td>"
            f"<td>{esc(label) if label is not None else ''}</td>"
            f"<td>{names(helpful[m])}</td><td>{names(harmful[m])}</td></tr>")
    more = (f"<p class='note'>{len(recurring) - shown} more recur.</p>"
            if len(recurring) > shown else "")
    return (f"<p>Training examples among the top {page.top} helpful or harmful of at least two "
            "queries, most frequent first: candidates to inspect (mislabelled, atypical or "
            "simply central to these predictions).</p><table class='recurring'><thead><tr>"
            "<th>training example</th><th>label</th><th>helpful for</th><th>harmful for</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>{more}")


# -- trust ------------------------------------------------------------------------------------
def _trust(page: _Page) -> str:
    if page.trust is None:
        return ("<p class='note'>Not measured for this run: <code>influencekit eval --store "
                f"{esc(str(page.store.path))} --trust</code> adds it.</p>")
    return (page.trust.to_html().replace("<h2>", "<h3>").replace("</h2>", "</h3>")
            + "<p class='note'>Each row measures one assumption influence functions rest on "
              "(convexity, numeric stability, training trajectory, parameter divergence, the "
              "first-order expansion). PASS: within the threshold; WARN: read the scores as a "
              "ranking rather than as numbers; FAIL: the scores may not predict retraining. "
              "See the user guide, \"Reading a trust report\".</p>")


# -- per query ----------------------------------------------------------------------------------
def _query_sections(page: _Page) -> str:
    parts = []
    for q in range(min(page.max_queries, len(page.query_ids))):
        parts.append(_query_section(page, q))
    return "".join(parts)


def _query_section(page: _Page, q: int) -> str:
    s = page.scores
    label, predicted = page.query_label(q)
    heading = esc(page.query_ids[q])
    if label is not None:
        heading += f" <span class='sub'>label {esc(label)}, predicted {esc(predicted)}</span>"
    n = page.score_info["n"]
    cards = {}
    for name in ("helpful", "harmful"):
        cards[name] = "".join(
            _train_card(page, q, int(m), float(v), n, name)
            for m, v in zip(s[f"{name}_index"][q, :page.top].tolist(),
                            s[f"{name}_score"][q, :page.top].tolist(), strict=True))
    towards, away = "", ""
    if page.config["task"].get("measurement") == "loss" and label is not None:
        towards, away = ": pulled toward this query's label", ": pushed away from it"
    hist = page.out / "img" / f"hist_{q}.png"
    plot_histogram(s["histogram_counts"][q].numpy(), s["histogram_edges"][q].numpy(), hist)
    return (f"<article class='query' id='q{q}'><h3>{heading}</h3><div class='query-body'>"
            f"<div class='query-card'>{_query_card(page, q)}"
            f"<figure><img class='hist' src='img/{hist.name}' alt='score histogram'>"
            f"<figcaption>scores of all {page.score_info['n_train']} training examples"
            f"</figcaption></figure></div>"
            f"<div class='tops'><h4>most helpful (s &gt; 0{towards})"
            f"</h4><div class='cards helpful'>{cards['helpful']}</div>"
            f"<h4>most harmful (s &lt; 0{away})</h4>"
            f"<div class='cards harmful'>{cards['harmful']}</div></div></div></article>")


def _query_card(page: _Page, q: int) -> str:
    kind = page.display.get("kind", "none")
    if kind == "image":
        path = page.out / "img" / f"query_{q}.png"
        if not path.exists():
            save_image(page.examples["query_x"][q].numpy(), page.display["image_shape"], path)
        content = (f"<img class='example query-image' src='img/{path.name}' "
                   f"alt='{esc(page.query_ids[q])}' data-query='{q}'>")
    elif kind == "text":
        tokens = page.display["query_tokens"][q]
        values = (page.scores["query_token_scores"][q].tolist()
                  if "query_token_scores" in page.scores else None)
        content = _heatmap(tokens, values, "query-tokens")
        meaning = page.score_info.get("query_token_scores_meaning")
        if values is not None and meaning:
            content += f"<p class='note'>{esc(meaning)}</p>"
    elif kind == "vector":
        content = _features(page, page.examples["query_x"][q].numpy())
    else:
        content = ""
    return f"<div class='card query'>{content}<div class='caption'>" \
           f"<b>{esc(page.query_ids[q])}</b></div></div>"


def _train_card(page: _Page, q: int, m: int, value: float, n: float, kind: str) -> str:
    label = page.train_label(m)
    caption = (f"<b>{esc(page.train_ids[m])}</b>"
               + (f"<br>label {esc(label)}" if label is not None else "")
               + f"<br>s = {value:+.3g}<br><span title='predicted change of f when removed'>"
               f"Δf ≈ {value / n:+.2g}</span>")
    body = _example_body(page, q, m)
    caption = f"<div class='caption'>{caption}</div>"
    inner = body + caption if page.display.get("kind") == "image" else caption + body
    return f"<div class='card {kind}' data-train='{m}' data-score='{value!r}'>{inner}</div>"


def _example_body(page: _Page, q: int | None, m: int) -> str:
    kind = page.display.get("kind", "none")
    if kind == "image" and m in page.train_row:
        path = page.out / "img" / f"train_{m}.png"
        if not path.exists():
            save_image(page.examples["train_x"][page.train_row[m]].numpy(),
                       page.display["image_shape"], path)
        return (f"<img class='example train-image' src='img/{path.name}' "
                f"alt='{esc(page.train_ids[m])}'>")
    if kind == "text":
        tokens = page.display["train_tokens"].get(str(m))
        if tokens is None:
            return ""
        values = None
        if q is not None and (q, m) in page.token_pairs:
            values = page.scores["train_token_scores"][page.token_pairs[(q, m)]].tolist()
        return _heatmap(tokens, values, "train-tokens")
    if kind == "vector" and m in page.train_row:
        return _features(page, page.examples["train_x"][page.train_row[m]].numpy())
    return ""


def _query_thumbnail(page: _Page, q: int) -> str:
    if page.display.get("kind") != "image":
        return ""
    path = page.out / "img" / f"query_{q}.png"
    if not path.exists():
        save_image(page.examples["query_x"][q].numpy(), page.display["image_shape"], path)
    return f"<img class='thumb' src='img/{path.name}' alt=''>"


def _thumbnail(page: _Page, m: int) -> str:
    if page.display.get("kind") == "image":
        return _example_body(page, None, m).replace("class='example", "class='thumb example")
    return ""


def _features(page: _Page, row: np.ndarray, count: int = 4) -> str:
    """The ``count`` features farthest from zero (standardised data: from the mean)."""
    names = page.display.get("feature_names") or [f"x{i}" for i in range(row.size)]
    order = np.argsort(-np.abs(row))[:count]
    items = "".join(f"<li>{esc(names[i])}: {row[i]:+.2f}</li>" for i in order)
    return f"<ul class='features'>{items}</ul>"


def _heatmap(tokens: list[str], values: list[float] | None, cls: str) -> str:
    """Tokens as spans; with ``values`` each span's background is green (helpful, s > 0) or red
    (harmful), its opacity |value| / max |value| of the sequence."""
    if values is None:
        return f"<p class='tokens {cls}'>" + "".join(
            f"<span class='tok'>{esc(t)}</span>" for t in tokens) + "</p>"
    finite = [abs(v) for v in values[:len(tokens)] if v is not None and math.isfinite(v)]
    scale = max(finite) if finite and max(finite) > 0 else 1.0
    spans = []
    for token, value in zip(tokens, values, strict=False):
        if value is None or not math.isfinite(value):
            spans.append(f"<span class='tok'>{esc(token)}</span>")
            continue
        alpha = min(abs(value) / scale, 1.0) * 0.85
        rgb = "46,125,50" if value > 0 else "198,40,40"
        spans.append(f"<span class='tok scored' data-score='{value!r}' "
                     f"style='background-color: rgba({rgb},{alpha:.3f})' "
                     f"title='{value:+.3g}'>{esc(token)}</span>")
    return f"<p class='tokens heatmap {cls}'>" + "".join(spans) + "</p>"


# -- evaluation ---------------------------------------------------------------------------------
def _evaluation(page: _Page) -> str:
    ev, metrics = page.evaluation, page.evaluation_info.get("metrics", {})
    if not ev:
        return ("<p class='note'>Not computed for this run: <code>influencekit eval</code> with "
                "<code>eval.loo</code>, <code>eval.lds_subsets</code>, <code>eval.removal</code>"
                " or <code>eval.response_curve</code> adds it.</p>")
    figures = []
    img = page.out / "img"
    ids = page.evaluation_info.get("query_ids", page.query_ids)
    if "response_epsilons" in ev:
        info = metrics["response"]
        path = plot_response(ev["response_epsilons"].numpy(), ev["response_real"].numpy(),
                             ev["response_tangent"].numpy(), img / "response.png",
                             f"{info['train']} reweighted; f of {info['query']}")
        figures.append(_figure(path, "Response curve", (
            f"The training objective re-optimised with {info['train']}'s weight set to 1 + ε, "
            f"and the change of the loss of {info['query']} (its most helpful example), beside "
            "the straight line influence functions predict. Where they part, the first-order "
            "expansion stops holding.")))
    if "loo_real" in ev:
        m = metrics["loo"]
        path = plot_scatter(ev["loo_predicted"].numpy(), ev["loo_real"].numpy(),
                            img / "loo.png", "predicted change +s/n", "real change of f",
                            f"leave-one-out: Pearson {m['pearson']:.3f}")
        figures.append(_figure(path, "Leave-one-out", (
            f"Each point is one (query, removed training example) pair for the {m['k']} "
            f"examples with the largest |s|: the change of f predicted by +s/n against the real "
            f"change after re-optimising without the example (Pearson {m['pearson']:.3f}, "
            f"Spearman {m['spearman']:.3f}).")))
    if "lds_real" in ev:
        m = metrics["lds"]
        path = plot_lds(ev["lds_predicted"][:, 0].numpy(), ev["lds_real"][:, 0].numpy(),
                        img / "lds.png", f"LDS of {ids[0]}: "
                        f"{float(ev['lds_per_query'][0]):.3f}")
        figures.append(_figure(path, "Linear datamodeling score", (
            f"{m['subsets']} random subsets of {m['alpha']:.0%} of the training data, each "
            f"retrained: the sum of the kept examples' scores against the query's real f after "
            f"retraining (first query shown). LDS = mean Spearman correlation over queries = "
            f"{m['mean']:.3f} ± {m['stderr']:.3f}.")))
    if "removal_top" in ev:
        path = plot_removal(ev["removal_k"].numpy(), ev["removal_top"].numpy(),
                            ev["removal_random"].numpy(), img / "removal.png",
                            "removal curves of the first queries")
        figures.append(_figure(path, "Removal curves", (
            "Remove the k training examples with the largest s (most helpful) and retrain: the "
            "query's loss should rise more than when k random examples are removed.")))
    table = "".join(f"<tr><td>{esc(k)}</td><td>{esc(_fmt_metrics(v))}</td></tr>"
                    for k, v in metrics.items())
    return (f"<table class='metrics'><tbody>{table}</tbody></table>"
            f"<div class='figures'>{''.join(figures)}</div>")


def _fmt_metrics(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} = {_fmt_metrics(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _figure(path: Path, title: str, caption: str) -> str:
    return (f"<figure class='plot'><img src='img/{path.name}' alt='{esc(title)}'>"
            f"<figcaption><b>{esc(title)}.</b> {esc(caption)}</figcaption></figure>")


def _figures(page: _Page) -> str:
    parts = []
    for figure in page.store.figures():
        source = page.store.path / FIGURES / figure["file"]
        if not source.is_file():
            continue
        shutil.copyfile(source, page.out / "img" / figure["file"])
        parts.append(_figure(page.out / "img" / figure["file"], figure["title"],
                             figure["caption"]))
    return "".join(parts)


# -- settings -----------------------------------------------------------------------------------
def _settings(page: _Page) -> str:
    config_rows = "".join(f"<tr><td>{esc(k)}</td><td><code>{esc(json.dumps(v))}</code></td></tr>"
                          for k, v in _flatten(page.config))
    timing_rows = []
    for command, record in page.record.get("commands", {}).items():
        for stage, seconds in record.get("timings", {}).items():
            timing_rows.append(f"<tr><td>{esc(command)}</td><td>{esc(stage)}</td>"
                               f"<td>{seconds:.2f} s</td><td>{esc(record.get('finished', ''))}"
                               "</td></tr>")
    versions = "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>"
                       for k, v in page.record.get("versions", {}).items())
    return ("<div class='settings'><div><h3>Timings</h3><table><thead><tr><th>command</th>"
            f"<th>stage</th><th>time</th><th>finished</th></tr></thead><tbody>"
            f"{''.join(timing_rows)}</tbody></table><h3>Versions</h3><table><tbody>{versions}"
            "</tbody></table></div><div><h3>Resolved config</h3><p class='note'>"
            f"<code>influencekit replay {esc(str(page.store.path))}</code> reruns exactly this"
            f"</p><table><tbody>{config_rows}</tbody></table></div></div>")


def _flatten(value, prefix: str = ""):
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, value


_STYLE = """
:root{--helpful:#2e7d32;--harmful:#c62828;--ink:#1d1d1f;--muted:#5f6368;--line:#d9dce1}
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);
  margin:0 auto;padding:12px 2vw 48px;max-width:1800px}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:21px;margin:28px 0 8px;
  border-bottom:2px solid var(--line);padding-bottom:4px}h3{font-size:17px;margin:14px 0 6px}
h4{font-size:14px;margin:8px 0 4px;color:var(--muted);font-weight:600}
.sub{font-weight:400;color:var(--muted);font-size:15px}
nav.toc{background:#f6f7f9;border:1px solid var(--line);border-radius:6px;padding:6px 14px;
  margin:10px 0}nav.toc ol{margin:4px 0;padding-left:20px;columns:2}
.note{color:var(--muted);font-size:14px}.convention{background:#f6f7f9;padding:8px 12px;
  border-left:4px solid #8e99a8}
table{border-collapse:collapse;font-size:14px;margin:6px 0}td,th{border:1px solid var(--line);
  padding:3px 8px;text-align:left;vertical-align:top}th{background:#f0f2f5}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:hover{background:#e3e7ec}
#query-search{font-size:15px;padding:4px 8px;width:min(480px,90%)}
article.query{border-top:1px solid var(--line);padding:6px 0 12px}
.query-body{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
.query-card{flex:0 0 300px}.tops{flex:1 1 600px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid var(--line);border-radius:6px;padding:6px;background:#fff;width:136px}
.card.helpful{border-top:4px solid var(--helpful)}.card.harmful{border-top:4px solid var(--harmful)}
.card.query{width:auto;border-top:4px solid #455a64}
.caption{font-size:13px;line-height:1.35;margin-top:4px;overflow-wrap:anywhere}
img.example{width:112px;height:112px;image-rendering:pixelated;display:block;
  border:1px solid #eee;object-fit:contain}
img.query-image{width:150px;height:150px}
img.thumb{width:32px;height:32px;image-rendering:pixelated;vertical-align:middle;
  margin-right:8px;border:1px solid #eee}img.hist{width:100%;max-width:330px}
figure{margin:8px 0}figcaption{font-size:13px;color:var(--muted)}
.figures{display:flex;flex-wrap:wrap;gap:24px}figure.plot{flex:0 1 520px}
figure.plot img{max-width:100%}
.tokens{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.8;
  margin:0;white-space:pre-wrap}.tok{border-radius:3px;padding:1px 0}
.card .tokens{max-height:180px;overflow:auto}.card:has(.tokens){width:300px}
ul.features{margin:0;padding-left:16px;font-size:13px}
.settings{display:flex;gap:32px;flex-wrap:wrap}
img.broken{outline:2px dashed var(--harmful)}
.verdict.pass{color:var(--helpful)}.verdict.warn{color:#a66d00}.verdict.fail{color:var(--harmful)}
"""

_SCRIPT = """
window.addEventListener('load',function(){
  /* record each image's decoded width; a broken image shows its name instead */
  Array.prototype.forEach.call(document.images,function(img){
    img.dataset.width=img.naturalWidth;
    if(!img.naturalWidth){img.classList.add('broken');}
  });
});
(function(){
  var table=document.getElementById('query-table');
  if(!table){return;}
  var search=document.getElementById('query-search');
  search.addEventListener('input',function(){
    var words=search.value.toLowerCase();
    Array.prototype.forEach.call(table.tBodies[0].rows,function(row){
      row.style.display=row.textContent.toLowerCase().indexOf(words)>=0?'':'none';});
  });
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th){
    th.addEventListener('click',function(){
      var col=+th.dataset.col,asc=th.dataset.order!=='asc';th.dataset.order=asc?'asc':'desc';
      var rows=Array.prototype.slice.call(table.tBodies[0].rows);
      function key(row){var c=row.cells[col];
        return c.dataset.v!==undefined?parseFloat(c.dataset.v):c.textContent.toLowerCase();}
      rows.sort(function(a,b){var x=key(a),y=key(b);return (x<y?-1:x>y?1:0)*(asc?1:-1);});
      rows.forEach(function(r){table.tBodies[0].appendChild(r);});
    });
  });
})();
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{style}</style></head>
<body><h1>{title}</h1>
<nav class="toc"><b>Contents</b><ol>{toc}</ol></nav>
{body}
<p class="note">Made by influencekit from a run store (layout: docs/store.md).</p>
<script>{script}</script>
</body></html>"""
