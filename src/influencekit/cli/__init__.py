"""The ``influencekit`` command line and the config -> objects -> store functions behind it.

``resolve_config(load_config(path))`` reads and checks a config; ``build_run(config)`` builds the
same objects as the Python API (Target, method, Curvature, Runtime); ``fit_run``, ``score_run``,
``evaluate_run`` and ``replay_run`` are the verbs as functions writing a
:class:`~influencekit.report.RunStore`. No maths here.
"""

from .build import Run, build_run, compute_scores
from .config import SCHEMA, apply_overrides, load_config, parse_override, resolve_config
from .pipeline import Outcome, evaluate_run, fit_run, replay_run, score_run
from .rundata import RunData

__all__ = ["RunData", "SCHEMA", "load_config", "parse_override", "apply_overrides",
           "resolve_config", "Run", "build_run", "compute_scores", "Outcome", "fit_run",
           "score_run", "evaluate_run", "replay_run"]
