"""Findings (one measured figure per assumption, with its threshold and verdict) and TrustReport."""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field

VERDICTS = ("pass", "warn", "fail", "skipped")
_RANK = {"pass": 0, "skipped": 0, "warn": 1, "fail": 2}


@dataclass
class Finding:
    """One measured figure and what it says about one assumption of influence functions.

    Attributes:
        assumption: ``"convexity"``, ``"numeric stability"``, ``"training trajectory"``,
            ``"parameter divergence"`` or ``"first-order expansion"``.
        name: short name of the figure (e.g. ``"negative curvature mass"``).
        value: the measured number (``nan`` when skipped).
        verdict: ``"pass"``, ``"warn"``, ``"fail"`` or ``"skipped"``.
        rule: the thresholds used, in words (e.g. ``"pass <= 0.001, warn <= 0.05"``).
        how: how the figure was obtained (``"exact (dense eigh)"``, ``"estimated (...)"``).
        details: further numbers (JSON-serialisable).
    """

    assumption: str
    name: str
    value: float
    verdict: str
    rule: str
    how: str = ""
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


def judge_at_most(value: float, pass_max: float, warn_max: float) -> tuple[str, str]:
    """Verdict for a figure that should be small: (verdict, rule)."""
    rule = f"pass <= {pass_max:g}, warn <= {warn_max:g}, else fail"
    if not math.isfinite(value):
        return "fail", rule
    if value <= pass_max:
        return "pass", rule
    return ("warn" if value <= warn_max else "fail"), rule


def judge_at_least(value: float, pass_min: float, warn_min: float) -> tuple[str, str]:
    """Verdict for a figure that should be large: (verdict, rule)."""
    rule = f"pass >= {pass_min:g}, warn >= {warn_min:g}, else fail"
    if not math.isfinite(value):
        return "fail", rule
    if value >= pass_min:
        return "pass", rule
    return ("warn" if value >= warn_min else "fail"), rule


def skipped(assumption: str, name: str, why: str) -> Finding:
    """A figure that was not measured, and why (``how`` says what to pass to measure it)."""
    return Finding(assumption, name, float("nan"), "skipped", "-", how=why)


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


@dataclass
class TrustReport:
    """How far an influence answer can be trusted: a list of :class:`Finding`.

    ``verdict`` is the worst verdict of the measured findings (skipped ones do not count).
    Print it for a table, ``to_json()`` for a dict, ``to_html()`` for a report fragment.
    """

    findings: list[Finding]
    context: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        measured = [f.verdict for f in self.findings if f.verdict != "skipped"]
        if not measured:
            return "skipped"
        return max(measured, key=_RANK.__getitem__)

    def by_assumption(self, assumption: str) -> list[Finding]:
        return [f for f in self.findings if f.assumption == assumption]

    def get(self, name: str) -> Finding:
        """The finding called ``name`` (KeyError if absent)."""
        for f in self.findings:
            if f.name == name:
                return f
        raise KeyError(f"no finding named {name!r}; have {[f.name for f in self.findings]}")

    def __str__(self) -> str:
        rows = [("assumption", "figure", "value", "verdict", "threshold", "how")]
        rows += [(f.assumption, f.name, _fmt(f.value), f.verdict.upper(), f.rule, f.how)
                 for f in self.findings]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [f"TrustReport: overall {self.verdict.upper()}"]
        for r in rows:
            cells = [c.ljust(w) for c, w in zip(r[:5], widths, strict=True)]
            lines.append("  ".join(cells) + "  " + r[5])
        return "\n".join(lines)

    def to_json(self) -> dict:
        """``{"verdict": ..., "context": {...}, "findings": [Finding as dict, ...]}``
        (NaN values become ``None``)."""
        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x
        out = {"verdict": self.verdict, "context": clean(self.context),
               "findings": [clean(asdict(f)) for f in self.findings]}
        json.dumps(out)  # fail early on something not serialisable
        return out

    def to_html(self) -> str:
        """A ``<section>`` with one table row per finding, coloured by verdict."""
        colours = {"pass": "#d4edda", "warn": "#fff3cd", "fail": "#f8d7da", "skipped": "#eeeeee"}
        esc = html.escape
        rows = "".join(
            f'<tr style="background:{colours[f.verdict]}"><td>{esc(f.assumption)}</td>'
            f"<td>{esc(f.name)}</td><td>{esc(_fmt(f.value))}</td>"
            f"<td><b>{esc(f.verdict)}</b></td><td>{esc(f.rule)}</td><td>{esc(f.how)}</td></tr>"
            for f in self.findings)
        return ('<section class="influencekit-trust">'
                f"<h2>How far to trust these scores: {esc(self.verdict)}</h2>"
                "<table><thead><tr><th>assumption</th><th>figure</th><th>value</th>"
                "<th>verdict</th><th>threshold</th><th>how</th></tr></thead>"
                f"<tbody>{rows}</tbody></table></section>")
