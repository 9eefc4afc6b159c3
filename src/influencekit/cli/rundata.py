"""RunData: what a config's data factory returns — training data, queries, and how to show them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DISPLAY_KINDS = ("image", "text", "vector", "none")


@dataclass
class RunData:
    """Training and query data for a CLI run, with names and a hint for the report.

    Attributes:
        train: the training data as every influencekit function takes it (a tuple of tensors
            ``(x, y)``, a ``Dataset`` or a non-shuffling ``DataLoader``); positions are indices.
        query: the candidate queries, same layout (the config's ``data.select`` and
            ``data.max_queries`` may keep a subset of them).
        train_ids / query_ids: one name per example (default ``"train #i"`` / ``"query #i"``);
            the terminal, the store and the report all use these names.
        display: how the report shows an example:
            ``{"kind": "image", "image_shape": [h, w]}`` (inputs are flattened or shaped
            images; ``[c, h, w]`` shows channel 0 or RGB when c = 3),
            ``{"kind": "text", "train_tokens": [[str]], "query_tokens": [[str]]}`` (one token
            list per example; scores per token come from the score store's ``token_scores``),
            ``{"kind": "vector", "feature_names": [str]}`` (tabular rows) or
            ``{"kind": "none"}`` (names and labels only).
        classes: class names for integer labels (classification), or None.
    """

    train: Any
    query: Any
    train_ids: list[str] | None = None
    query_ids: list[str] | None = None
    display: dict = field(default_factory=lambda: {"kind": "none"})
    classes: list[str] | None = None


def as_run_data(value) -> RunData:
    """Accept a :class:`RunData`, a ``(train, query)`` pair or a mapping with those keys."""
    if isinstance(value, RunData):
        return value
    if isinstance(value, Mapping):
        known = {"train", "query", "train_ids", "query_ids", "display", "classes"}
        unknown = set(value) - known
        if unknown or not {"train", "query"} <= set(value):
            raise TypeError(f"a data mapping needs keys 'train' and 'query' (optional "
                            f"{sorted(known - {'train', 'query'})}); got {sorted(value)}")
        return RunData(**value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return RunData(train=value[0], query=value[1])
    raise TypeError(f"got {type(value).__name__}; return RunData(train=..., query=...), a "
                    "(train, query) pair or a dict with keys 'train' and 'query'")
