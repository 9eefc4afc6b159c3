"""Partitions for job arrays whose workers cannot talk to each other.

``Partition.parse("3/8")`` is the fourth of eight jobs (indices are 0-based, like
``$SLURM_ARRAY_TASK_ID`` with ``--array=0-7``). Each job computes the contiguous share
``partition.range(n)`` of the training examples into its own partial store; a merge combines the
eight partial stores into one (``influencekit.storage.merge_score_stores``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import DistributedError
from .split import contiguous_range

_SPEC = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Partition:
    """Job ``index`` of ``count`` (0-based): which contiguous share of the examples it does."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if isinstance(self.index, bool) or not isinstance(self.index, int):
            raise DistributedError(f"partition index must be an integer, got {self.index!r}.")
        if isinstance(self.count, bool) or not isinstance(self.count, int):
            raise DistributedError(f"partition count must be an integer, got {self.count!r}.")
        if self.count < 1:
            raise DistributedError(
                f"partition count {self.count} is not positive: write INDEX/COUNT with "
                "COUNT >= 1, e.g. 3/8.")
        if not 0 <= self.index < self.count:
            raise DistributedError(
                f"partition index {self.index} is outside 0..{self.count - 1} for "
                f"{self.count} partitions (indices are 0-based: 0/{self.count} is the first, "
                f"{self.count - 1}/{self.count} the last).")

    @classmethod
    def parse(cls, spec: str | Partition | None) -> Partition:
        """``"3/8"`` -> ``Partition(3, 8)``; ``None`` -> the whole run (``0/1``)."""
        if spec is None:
            return cls()
        if isinstance(spec, Partition):
            return spec
        match = _SPEC.match(str(spec))
        if match is None:
            raise DistributedError(
                f"partition {spec!r} is not of the form INDEX/COUNT (e.g. 3/8 for the fourth of "
                "eight jobs, 0-based).")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def is_whole(self) -> bool:
        """True for ``0/1``: the run is not partitioned."""
        return self.count == 1

    def range(self, n: int) -> range:
        """This job's contiguous share of ``range(n)`` (uneven shares allowed)."""
        return contiguous_range(n, self.count, self.index)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
