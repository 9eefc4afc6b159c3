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

Every file is checksummed and verified on load; every refusal is a
:class:`~influencekit.errors.StoreError` naming the file and the fix:

- every tensor folder is a ``storage.save_tensors`` folder (safetensors + a JSON manifest that
  records the sha256 of the tensor file and carries its own checksum);
- ``config.json``, ``run.json``, ``trust.json`` and ``figures/figures.json`` carry their own
  checksum (a ``"checksum"`` entry: sha256 of the canonical JSON of the other entries, see
  :func:`influencekit.storage.files.write_json`) and are written atomically;
  ``figures/figures.json`` records the sha256 of every PNG it lists;
- a random ``run_store_id``, drawn when ``config.json`` is first written and kept by every
  later command, is recorded in each of these JSON files; ``run.json``, ``trust.json`` and
  ``figures.json`` are refused when theirs is not ``config.json``'s (a file copied from another
  run store, whose own checksum is valid);
- ``run.json`` lists the parts the store held when its last command finished (``parts``), so a
  deleted ``trust.json``, ``figures.json`` or tensor file is refused, not read as "never
  written"; a store with an ``inverse/`` or ``scores/`` but no ``run.json`` is refused too.

Each file carries its own checksum (there is no store-wide manifest), so the jobs of a
partitioned run that share a store never race on a common file.
"""

from __future__ import annotations

import hashlib
import math
import platform
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import StoreError
from ..storage import load_tensors, safe_path, save_tensors
from ..storage.files import read_json, write_json

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
FIGURE_LIST = "figures.json"
TENSOR_PARTS = (INVERSE, SCORES, EXAMPLES, EVALUATION)
LISTED_PARTS = (*TENSOR_PARTS, TRUST, f"{FIGURES}/{FIGURE_LIST}")
"""What ``run.json`` lists in ``parts`` when present: the store refuses to lose one silently."""
TENSOR_FILES = ("manifest.json", "tensors.safetensors")
STORE_ID = "run_store_id"

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
        """Record ``config`` in config.json, keeping the store's ``run_store_id`` (a new one
        when there is no readable config.json)."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            store_id = self._store_id()
        except StoreError:  # a corrupt config.json is being replaced
            store_id = None
        write_json(self.path / CONFIG, {**_clean(config),
                                        STORE_ID: store_id or uuid.uuid4().hex})

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
        """The run's resolved config (``config.json``, checksum verified)."""
        path = self.path / CONFIG
        if not path.exists():
            raise StoreError(f"{self.path} is not a run store: it has no {CONFIG}. Create one "
                             "with `influencekit fit CONFIG --store "
                             f"{self.path}`.")
        config = read_json(path, self._fix(CONFIG))
        config.pop(STORE_ID, None)
        return config

    def run_record(self) -> dict:
        """``run.json`` (checksum verified). A store that holds no command's output yet gives an
        empty record; one whose ``inverse/`` or ``scores/`` exists but has no ``run.json`` is
        refused (it was deleted)."""
        path = self.path / RUN
        if not path.exists():
            written = [p for p in (INVERSE, SCORES) if (self.path / p).exists()]
            if written:
                raise StoreError(f"{path} is missing although the store holds {written}: it was "
                                 f"deleted; {self._fix(RUN)}")
            return {"versions": versions(), "commands": {}}
        return self._read_own(RUN)

    def record_command(self, command: str, timings: dict[str, float], facts: dict) -> None:
        """Add ``command``'s stage timings (seconds) and facts to run.json, and the list of
        parts the store now holds. A corrupt run.json is replaced (with a warning): the
        command's own output is already written and checked."""
        try:
            record = self._read_own(RUN) if (self.path / RUN).exists() else {}
        except StoreError as exc:
            warnings.warn(f"{exc} It is replaced by a new record of this command.",
                          stacklevel=2)
            record = {}
        record["versions"] = versions()
        record.setdefault("commands", {})[command] = {
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "facts": _clean(facts),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        record["parts"] = [p for p in LISTED_PARTS if (self.path / p).exists()]
        self._write_own(RUN, _clean(record))

    # -- tensor folders ----------------------------------------------------------------------
    def write(self, part: str, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
        save_tensors(self.path / part, tensors, {"kind": part, **_clean(manifest)})

    def read(self, part: str) -> tuple[dict[str, torch.Tensor], dict]:
        self._check_listed(part)
        return load_tensors(self.path / part)

    def has(self, part: str) -> bool:
        """Whether the tensor folder ``part`` was written: it holds either of its files (one
        alone is refused by :meth:`read`); raises when ``run.json`` lists it but it is gone."""
        folder = self.path / part
        if folder.is_dir() and any((folder / name).exists() for name in TENSOR_FILES):
            return True
        self._check_listed(part)
        return False

    # -- trust report ------------------------------------------------------------------------
    def write_trust(self, report) -> None:
        self._write_own(TRUST, _clean(report.to_json()))

    def trust(self):
        """The stored :class:`~influencekit.diagnostics.TrustReport`, or None."""
        from ..diagnostics import Finding, TrustReport

        path = self.path / TRUST
        if not path.exists():
            self._check_listed(TRUST)
            return None
        data = self._read_own(TRUST)
        try:
            findings = [Finding(**{**f, "value": math.nan if f["value"] is None
                                   else f["value"]}) for f in data["findings"]]
            return TrustReport(findings, data.get("context", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{path} is not a trust report of this influencekit ({exc!r}); "
                             f"{self._fix(TRUST)}") from exc

    # -- extra figures -----------------------------------------------------------------------
    def figure_path(self, name: str) -> Path:
        """Where to save an extra figure's PNG before :meth:`add_figure`."""
        folder = self.path / FIGURES
        folder.mkdir(parents=True, exist_ok=True)
        return safe_path(folder, name)

    def add_figure(self, name: str, title: str, caption: str) -> None:
        """List ``figures/<name>`` (already saved) with its title, caption and sha256."""
        data = self.figure_path(name).read_bytes()
        listing = [f for f in self.figures() if f["file"] != name]
        listing.append({"file": name, "title": title, "caption": caption,
                        "sha256": hashlib.sha256(data).hexdigest()})
        self._write_own(f"{FIGURES}/{FIGURE_LIST}", {"figures": listing})

    def figures(self) -> list[dict]:
        """The extra figures ``[{"file", "title", "caption", "sha256"}]``, each PNG verified."""
        name = f"{FIGURES}/{FIGURE_LIST}"
        path = self.path / FIGURES / FIGURE_LIST
        if not path.exists():
            self._check_listed(name)
            return []
        listing = self._read_own(name).get("figures")
        if not isinstance(listing, list) or not all(isinstance(f, dict) for f in listing):
            raise StoreError(f"{path} holds no list of figures; {self._fix(name)}")
        for figure in listing:
            self._check_figure(figure, path)
        return listing

    def _check_figure(self, figure: dict, listing: Path) -> None:
        source = safe_path(self.path / FIGURES, figure.get("file"))
        fix = f"save that figure again (RunStore.add_figure) or remove it from {listing}."
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise StoreError(f"{source}, listed in {listing}, cannot be read ({exc}); "
                             f"{fix}") from exc
        if hashlib.sha256(data).hexdigest() != figure.get("sha256"):
            raise StoreError(f"{source} does not match the sha256 recorded in {listing} "
                             f"(truncated, modified or replaced); {fix}")

    # -- checks ------------------------------------------------------------------------------
    def _store_id(self) -> str | None:
        """config.json's ``run_store_id`` (None when there is no config.json)."""
        path = self.path / CONFIG
        if not path.exists():
            return None
        return read_json(path, self._fix(CONFIG)).get(STORE_ID)

    def _write_own(self, name: str, record: dict) -> None:
        """Write the JSON file ``name`` (relative to the store) with the store's id."""
        store_id = self._store_id()
        if store_id is None:
            raise StoreError(f"{self.path} has no {CONFIG}: write the config first "
                             "(RunStore.write_config).")
        write_json(self.path / name, {**record, STORE_ID: store_id})

    def _read_own(self, name: str) -> dict:
        """Read the JSON file ``name``; refuse it when it belongs to another run store."""
        path = self.path / name
        record = read_json(path, self._fix(name))
        theirs, ours = record.pop(STORE_ID, None), self._store_id()
        if theirs != ours:
            raise StoreError(f"{path} and {self.path / CONFIG} belong to different run stores "
                             f"(run_store_id {_short_id(theirs)} against {_short_id(ours)}): one "
                             f"of them was copied from another store; {self._fix(name)}")
        return record

    def _fix(self, name: str) -> str:
        return (f"the run store's {name} is corrupt: run the command that writes it again "
                f"(`influencekit fit/score/eval --store {self.path}`; `--overwrite` starts the "
                "run afresh).")

    def _check_listed(self, part: str) -> None:
        """Refuse when run.json says the store held ``part`` but it is gone."""
        path = self.path / RUN
        if not path.exists() or (self.path / part).exists():
            return
        if part in read_json(path, self._fix(RUN)).get("parts", []):
            raise StoreError(f"{self.path / part} is missing although {path} lists it among "
                             f"the parts written: it was deleted; {self._fix(part)}")


def _short_id(value) -> str:
    return repr(value[:8] + "...") if isinstance(value, str) else repr(value)


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
