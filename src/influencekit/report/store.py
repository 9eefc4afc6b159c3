"""The run store: one folder per run that `fit`, `score` and `eval` write and `report` reads.

Layout (also in ``docs/store.md``)::

    STORE/
      config.json     the resolved config (every key, defaults filled in); `replay` reruns it
      run.json        versions (influencekit, torch, numpy, python, platform), per command the
                      stage timings in seconds, facts (n_train, p, accuracies) and the time it ran
      inverse/        the fitted inverse: ik.storage.save_inverse (absent for TracIn / TRAK)
      scores/         tensors (ik.storage.save_tensors), see SCORE_TENSORS
      examples/       what the report shows of each example, see EXAMPLE_TENSORS
      evaluation/     ground truth against real retraining, see EVALUATION_TENSORS
      trust.json      ik.diagnostics.check(...).to_json()
      figures/        extra PNGs shown at the end of the report, listed with a title and a
                      caption in figures/figures.json (e.g. the demo's thesis appendix)
      report/         index.html and its PNGs (`influencekit report`)
      partitions/     partial score stores of `score --partition I/N` (one folder each) and
                      `merged/`, their merge (`influencekit merge`)

Every tensor folder is a ``storage.save_tensors`` folder (safetensors + a JSON manifest with a
checksum), so a truncated or edited file is detected on load.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import StoreError
from ..storage import load_tensors, save_tensors

CONFIG = "config.json"
RUN = "run.json"
INVERSE = "inverse"
SCORES = "scores"
EXAMPLES = "examples"
EVALUATION = "evaluation"
TRUST = "trust.json"
FIGURES = "figures"
REPORT = "report"
PARTITIONS = "partitions"

SCORE_TENSORS = {
    "scores": "[n_query, n_train] s = g_qᵀ(C + λI)⁻¹g_m (only when score.top_k = 0)",
    "helpful_index": "[n_query, k] training positions of the k largest scores, best first",
    "helpful_score": "[n_query, k] their scores",
    "harmful_index": "[n_query, k] training positions of the k smallest scores, worst first",
    "harmful_score": "[n_query, k] their scores",
    "histogram_counts": "[n_query, bins] how many training examples fall in each score bin",
    "histogram_edges": "[n_query, bins + 1] the bin edges",
    "self_influence": "[n_train] g_mᵀ(C + λI)⁻¹g_m (when score.self_influence)",
    "token_pairs": "[P, 2] (query, train) positions that have per-token scores (text data)",
    "train_token_scores": "[P, T] per-token terms of s for pair P's training example; NaN pads; "
                          "a row plus train_token_rest sums to the pair's score",
    "train_token_rest": "[P] the part of pair P's score tied to no training token (layers on a "
                        "pooled vector, flat parameters, ∇R); 0 for a causal LM's blocks",
    "query_token_scores": "[n_query, T_q] per-token terms for each query's own tokens; NaN "
                          "pads; the manifest's query_token_scores_meaning says of which score",
}

EXAMPLE_TENSORS = {
    "query_x": "[n_query, ...] query inputs (image or vector display)",
    "query_labels": "[n_query] integer labels (classification)",
    "query_predictions": "[n_query] predicted classes (classification)",
    "query_positions": "[n_query] positions in the data factory's query set",
    "train_rows": "[r] training positions whose inputs are stored (those in any top-k list)",
    "train_x": "[r, ...] their inputs (image or vector display)",
    "train_labels": "[n_train] integer labels (classification)",
}

EVALUATION_TENSORS = {
    "loo_indices": "[k] training positions left out",
    "loo_predicted": "[n_eval, k] predicted change of f, +s/n",
    "loo_real": "[n_eval, k] real change of f after re-optimisation without the example",
    "lds_subsets": "[S, n_train] 1 where the subset keeps the example",
    "lds_real": "[S, n_eval] f after retraining on each subset",
    "lds_predicted": "[S, n_eval] −Σ_{m∈S} s_qm (the LDS ranks these)",
    "lds_per_query": "[n_eval] Spearman correlation per query",
    "removal_k": "[K] numbers of examples removed",
    "removal_top": "[n_removal, K] change of f after removing the top-k helpful and retraining",
    "removal_random": "[n_removal, K] the same for k random examples",
    "response_epsilons": "[E] weight changes ε (weight 1 + ε)",
    "response_real": "[E] f(θ̂(ε)) − f(θ̂) of the first query, re-optimised",
    "response_tangent": "[E] ε · ∂f/∂w_m, the first-order prediction",
}


class RunStore:
    """Reads and writes one run folder (see the module docstring for the layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- config and run record ---------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / CONFIG).is_file()

    def write_config(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_json(self.path / CONFIG, config)

    def prepare(self, config: dict, fit_keys, overwrite: bool = False) -> None:
        """Make the store ready for a command of ``config``: refuse (``StoreError``) when it
        holds a run whose ``fit_keys(config)`` differ, unless ``overwrite`` (then the old run's
        files are removed); then record ``config``."""
        if self.exists():
            old, new = fit_keys(self.config()), fit_keys(config)
            if old != new:
                if not overwrite:
                    keys = ", ".join(_differences(old, new)[:4])
                    raise StoreError(
                        f"{self.path} holds a run of another config (differs in {keys}); "
                        "use a new --store, or --overwrite to replace that run.")
                self.clear()
        self.write_config(config)

    def clear(self) -> None:
        """Remove every file and folder of the layout above (nothing else)."""
        import shutil

        for name in (CONFIG, RUN, TRUST):
            (self.path / name).unlink(missing_ok=True)
        for name in (INVERSE, SCORES, EXAMPLES, EVALUATION, FIGURES, REPORT, PARTITIONS,
                     "lds_retraining"):
            shutil.rmtree(self.path / name, ignore_errors=True)

    def config(self) -> dict:
        path = self.path / CONFIG
        if not path.is_file():
            raise StoreError(f"{self.path} is not a run store: it has no {CONFIG}. Create one "
                             "with `influencekit fit CONFIG --store "
                             f"{self.path}`.")
        return json.loads(path.read_text())

    def run_record(self) -> dict:
        path = self.path / RUN
        if not path.is_file():
            return {"versions": versions(), "commands": {}}
        return json.loads(path.read_text())

    def record_command(self, command: str, timings: dict[str, float], facts: dict) -> None:
        """Add ``command``'s stage timings (seconds) and facts to run.json."""
        record = self.run_record()
        record["versions"] = versions()
        record.setdefault("commands", {})[command] = {
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "facts": _clean(facts),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_json(self.path / RUN, record)

    # -- tensor folders ----------------------------------------------------------------------
    def write(self, part: str, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
        save_tensors(self.path / part, tensors, {"kind": part, **_clean(manifest)})

    def read(self, part: str) -> tuple[dict[str, torch.Tensor], dict]:
        return load_tensors(self.path / part)

    def has(self, part: str) -> bool:
        return (self.path / part / "manifest.json").is_file() or (self.path / part).is_file()

    # -- trust report ------------------------------------------------------------------------
    def write_trust(self, report) -> None:
        _write_json(self.path / TRUST, report.to_json())

    def trust(self):
        """The stored :class:`~influencekit.diagnostics.TrustReport`, or None."""
        from ..diagnostics import Finding, TrustReport

        path = self.path / TRUST
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        findings = [Finding(**{**f, "value": math.nan if f["value"] is None else f["value"]})
                    for f in data["findings"]]
        return TrustReport(findings, data.get("context", {}))


    # -- extra figures -----------------------------------------------------------------------
    def figure_path(self, name: str) -> Path:
        """Where to save an extra figure's PNG before :meth:`add_figure`."""
        folder = self.path / FIGURES
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def add_figure(self, name: str, title: str, caption: str) -> None:
        """List ``figures/<name>`` (already saved) with its title and caption."""
        listing = [f for f in self.figures() if f["file"] != name]
        listing.append({"file": name, "title": title, "caption": caption})
        _write_json(self.path / FIGURES / "figures.json", listing)

    def figures(self) -> list[dict]:
        path = self.path / FIGURES / "figures.json"
        return json.loads(path.read_text()) if path.is_file() else []


def _differences(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k),
                                                      f"{prefix}.{k}" if prefix else k)]
    return [] if old == new else [prefix]


def versions() -> dict:
    """Versions of what produced a store."""
    from .. import __version__

    return {"influencekit": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


def _clean(value):
    """JSON-safe copy: tensors and arrays to lists, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(value), indent=2, sort_keys=True))
    tmp.replace(path)
