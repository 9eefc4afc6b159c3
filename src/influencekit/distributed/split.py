"""Deterministic splits of work: contiguous ranges of examples and owners of named modules.

Pure functions (no communication): every process computes the same answer from the same inputs,
which is what lets ranks agree on who does what without talking.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import DistributedError


def contiguous_range(n: int, parts: int, index: int) -> range:
    """The ``index``-th of ``parts`` contiguous pieces of ``range(n)``.

    The first ``n % parts`` pieces hold one item more than the others (uneven splits are
    allowed: 10 items over 3 parts give 4, 3, 3). Pieces may be empty when ``parts > n``.
    """
    if n < 0:
        raise DistributedError(f"cannot split a negative number of items ({n}).")
    if parts < 1:
        raise DistributedError(f"the number of parts must be at least 1, got {parts}.")
    if not 0 <= index < parts:
        raise DistributedError(f"part index {index} is outside 0..{parts - 1}.")
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def assign_owners(names: Sequence[str], parts: int,
                  costs: Sequence[float] | None = None) -> dict[str, int]:
    """``{name: owning part}``, balancing the summed ``costs`` (default: 1 per name).

    Greedy: names in decreasing cost (ties in the given order) each go to the least loaded part
    (ties to the lowest index). The result depends only on the arguments, so every rank agrees.
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise DistributedError(f"module names must be unique, got {names}.")
    if parts < 1:
        raise DistributedError(f"the number of parts must be at least 1, got {parts}.")
    if costs is None:
        costs = [1.0] * len(names)
    costs = [float(c) for c in costs]
    if len(costs) != len(names):
        raise DistributedError(f"got {len(costs)} costs for {len(names)} module names; pass one "
                               "cost per name (e.g. the cube of each factor's size).")
    order = sorted(range(len(names)), key=lambda i: (-costs[i], i))
    load = [0.0] * parts
    owners: dict[str, int] = {}
    for i in order:
        part = min(range(parts), key=lambda r: (load[r], r))
        owners[names[i]] = part
        load[part] += costs[i]
    return {name: owners[name] for name in names}
