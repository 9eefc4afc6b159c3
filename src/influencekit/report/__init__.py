"""HTML/PNG reports read from a store."""

from .html import render_examples_report, top_examples
from .plots import plot_response_curves

__all__ = ["render_examples_report", "top_examples", "plot_response_curves"]
