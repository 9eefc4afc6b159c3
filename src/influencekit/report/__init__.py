"""Reports read from a run store: one HTML page with PNGs beside it (no network assets).

``render_report(store)`` renders :class:`RunStore` folders written by ``influencekit fit /
score / eval`` (or by :func:`influencekit.cli.score_run` and friends); the layout is documented
in :mod:`influencekit.report.store` and ``docs/store.md``.
"""

from .html import render_report, top_examples
from .plots import plot_response_curves
from .store import RunStore

__all__ = ["render_report", "top_examples", "plot_response_curves", "RunStore"]
