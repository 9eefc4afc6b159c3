"""How to run (never what to compute): device, dtype, batch size, progress, memory budget.

Maths settings (damping, rank, iterations, curvature kind) live on the algorithm objects. Changing
the Runtime may change results only within dtype tolerance.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Runtime:
    """Execution settings shared by every influencekit computation.

    Attributes:
        device: where tensors are computed (``"cpu"``, ``"cuda"``, ...).
        dtype: dtype of gradients and curvature products; ``None`` keeps the parameters' dtype.
            Dense factorisations (eigh, Cholesky) are always done in float64.
        batch_size: examples per batch when influencekit builds a loader from tensors.
        progress: show progress bars; ``None`` shows them only when stderr is a terminal.
        max_dense_bytes: memory budget of one dense ``[p, p]`` curvature matrix in float64.
        engine: how per-example gradients are computed: ``"auto"`` (layer hooks where the
            layer is supported, else vmap, else a per-example loop), ``"hooks"``, ``"vmap"``
            or ``"loop"`` (see :class:`influencekit.grads.GradientEngine`).
    """

    device: str | torch.device = "cpu"
    dtype: torch.dtype | None = None
    batch_size: int = 256
    progress: bool | None = None
    max_dense_bytes: int = 4 * 1024**3
    engine: str = "auto"

    def replace(self, **changes) -> Runtime:
        """Return a copy with some fields changed."""
        return replace(self, **changes)

    @property
    def show_progress(self) -> bool:
        if self.progress is None:
            return sys.stderr.isatty()
        return self.progress

    def bar(self, iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it"):
        """A tqdm progress bar that honours ``progress``."""
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not self.show_progress,
                    leave=False, dynamic_ncols=True)


DEFAULT_RUNTIME = Runtime()


def resolve_runtime(runtime: Runtime | None) -> Runtime:
    return DEFAULT_RUNTIME if runtime is None else runtime
