"""HTML + PNG reports read from a store (``storage.save_tensors`` folder).

An "examples" store holds ``scores [n_query, n_train]``, ``query_x``, ``query_y``,
``query_pred``, ``train_x``, ``train_y`` (images flattened) and, in its manifest, ``image_shape``,
``n_train`` (for the removal-effect scale s/n), ``measurement`` and free text ``title``/``notes``.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from ..storage import load_tensors


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def top_examples(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k most helpful (largest s) and k most harmful (smallest s) per query."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k], order[:, ::-1][:, :k]


def render_examples_report(store: str | Path, out: str | Path, k: int = 5,
                           max_queries: int = 12, extra_html: str = "") -> Path:
    """Write ``out/index.html`` and one PNG per query; returns the HTML path.

    ``extra_html`` (e.g. a ``TrustReport.to_html()``) is placed after the examples."""
    tensors, manifest = load_tensors(store)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores = tensors["scores"].numpy()
    n = manifest["n_train"]
    helpful, harmful = top_examples(scores, k)
    rows = []
    for q in range(min(len(scores), max_queries)):
        png = out / f"query_{q}.png"
        _plot_query(tensors, manifest, q, helpful[q], harmful[q], png)
        rows.append(_query_html(tensors, manifest, q, helpful[q], harmful[q], png.name, n))
    extra = "".join(f'<h2>{html.escape(title)}</h2><img src="{html.escape(name)}">'
                    for title, name in manifest.get("figures", []))
    page = out / "index.html"
    page.write_text(_PAGE.format(title=html.escape(manifest.get("title", "influence report")),
                                 notes=html.escape(manifest.get("notes", "")),
                                 rows="".join(rows), extra=extra + extra_html))
    return page


def _plot_query(tensors, manifest, q, helpful, harmful, path):
    plt = _pyplot()
    shape = manifest["image_shape"]
    k = len(helpful)
    fig, axes = plt.subplots(2, k + 1, figsize=(1.7 * (k + 1), 4.2))
    query_img = tensors["query_x"][q].numpy().reshape(shape)
    for row in range(2):
        axes[row, 0].axis("off")
    axes[0, 0].imshow(query_img, cmap="gray_r")
    axes[0, 0].set_title(f"query {q}\nlabel {int(tensors['query_y'][q])} "
                         f"pred {int(tensors['query_pred'][q])}", fontsize=8)
    for row, (name, idx) in enumerate((("helpful", helpful), ("harmful", harmful))):
        for j, m in enumerate(idx):
            ax = axes[row, j + 1]
            ax.imshow(tensors["train_x"][m].numpy().reshape(shape), cmap="gray_r")
            ax.set_title(f"{name} #{m}\ny={int(tensors['train_y'][m])} "
                         f"s={float(tensors['scores'][q, m]):.3g}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _query_html(tensors, manifest, q, helpful, harmful, png, n):
    def cells(idx):
        return "".join(
            f"<tr><td>{m}</td><td>{int(tensors['train_y'][m])}</td>"
            f"<td>{float(tensors['scores'][q, m]):+.4g}</td>"
            f"<td>{float(tensors['scores'][q, m]) / n:+.3g}</td></tr>" for m in idx)
    header = "<tr><th>train #</th><th>label</th><th>score s</th><th>removal effect s/n</th></tr>"
    return (f"<section><h3>query {q}: label {int(tensors['query_y'][q])}, predicted "
            f"{int(tensors['query_pred'][q])}</h3><img src='{png}'>"
            f"<div class='tables'><table><caption>most helpful</caption>{header}{cells(helpful)}"
            f"</table><table><caption>most harmful</caption>{header}{cells(harmful)}</table>"
            "</div></section>")


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}table{{border-collapse:collapse;
margin:4px 16px 4px 0;font-size:13px}}td,th{{border:1px solid #ccc;padding:2px 6px}}
.tables{{display:flex}}section{{border-top:1px solid #999;margin-top:12px}}</style></head>
<body><h1>{title}</h1><p>{notes}</p>{rows}{extra}</body></html>"""
