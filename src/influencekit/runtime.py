"""How to run (never what to compute): device, dtype, batch size, progress, memory budget,
and the processes of a distributed run.

Maths settings (damping, rank, iterations, curvature kind) live on the algorithm objects. Changing
the Runtime may change results only within dtype tolerance.

Progress: long loops show a tqdm bar (``tqdm.auto``: a widget in notebooks) when stderr is a
terminal or the code runs in a notebook. Elsewhere (CI, ``| tee``) each :func:`stage` and each
loop that took a second or more logs one line with its duration on the ``influencekit`` logger
(level INFO; shorter loops at DEBUG), so a log shows where the time went; configure ``logging``
to see them (the CLI does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from .distributed import DistContext


@dataclass(frozen=True)
class Runtime:
    """Execution settings shared by every influencekit computation.

    Attributes:
        device: where tensors are computed (``"cpu"``, ``"cuda"``, ...).
        dtype: dtype of gradients and curvature products; ``None`` keeps the parameters' dtype.
            Dense factorisations (eigh, Cholesky) are always done in float64.
        batch_size: examples per batch when influencekit builds a loader from tensors.
        progress: show progress bars; ``None`` shows them when stderr is a terminal or in a
            notebook, and otherwise logs one line per finished loop; ``False`` shows none.
        max_dense_bytes: memory budget of one dense ``[p, p]`` curvature matrix in float64.
        engine: how per-example gradients are computed: ``"auto"`` (layer hooks where the
            layer is supported, else vmap, else a per-example loop), ``"hooks"``, ``"vmap"``
            or ``"loop"`` (see :class:`influencekit.grads.GradientEngine`).
        context: the processes of a run under ``torchrun``
            (:meth:`influencekit.distributed.DistContext.from_env`); ``None`` is one process.
            With several processes, curvature statistics (K-FAC / EK-FAC factors and
            eigenvalue corrections, the dense curvature, curvature-vector products), gradients
            (:func:`influencekit.grads.gradients`) and scores (``Influence.pairwise``,
            ``self_influence``, TRAK) are computed over each process's share of the training
            data and combined, and per-module eigendecompositions are split across processes.
            Every process must make the same calls with the same arguments (as with any
            collective); every process gets the whole result.
    """

    device: str | torch.device = "cpu"
    dtype: torch.dtype | None = None
    batch_size: int = 256
    progress: bool | None = None
    max_dense_bytes: int = 4 * 1024**3
    engine: str = "auto"
    context: DistContext | None = None

    def replace(self, **changes) -> Runtime:
        """Return a copy with some fields changed."""
        return replace(self, **changes)

    @property
    def dist(self) -> DistContext:
        """The processes of the run: ``context``, or a single process."""
        return self.context if self.context is not None else SINGLE_PROCESS

    def local(self) -> Runtime:
        """This runtime for work done by this process alone (``context=None``)."""
        return self if self.context is None else replace(self, context=None)

    @property
    def show_progress(self) -> bool:
        if self.progress is None:
            return interactive()
        return self.progress

    def bar(self, iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it"):
        """A tqdm progress bar that honours ``progress``.

        With ``progress=None`` and no terminal or notebook, no bar is drawn; iterating logs one
        line when the loop ends (``"<desc>: <count> <unit> in <seconds> s"``; INFO from one
        second up, DEBUG below)."""
        bar = tqdm(iterable, total=total, desc=desc, unit=unit, disable=not self.show_progress,
                   leave=False, dynamic_ncols=True)
        if self.progress is None and not self.show_progress and iterable is not None and desc:
            return _logged(bar, desc, unit)
        return bar


log = logging.getLogger("influencekit")


def interactive() -> bool:
    """True when stderr is a terminal or the code runs in a Jupyter kernel."""
    if sys.stderr.isatty():
        return True
    shell = sys.modules.get("IPython")
    try:
        ip = shell.get_ipython() if shell is not None else None
    except Exception:  # noqa: BLE001 - IPython half-imported
        ip = None
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


LOG_LOOPS_FROM_SECONDS = 1.0


def _logged(iterable, desc: str, unit: str):
    """Yield from ``iterable``; log its length and duration when it is exhausted (INFO when it
    took at least ``LOG_LOOPS_FROM_SECONDS``, DEBUG otherwise: short inner loops, e.g. one per
    Newton step, would drown the stages)."""
    start, count = time.perf_counter(), 0
    for item in iterable:
        count += 1
        yield item
    seconds = time.perf_counter() - start
    level = logging.INFO if seconds >= LOG_LOOPS_FROM_SECONDS else logging.DEBUG
    log.log(level, "%s: %d %s in %.2f s", desc, count, unit, seconds)


@contextmanager
def stage(name: str, timings: dict | None = None):
    """Time a stage of work: logs ``"<name> ..."`` and ``"<name> done in <s> s"`` (INFO) and,
    when given, stores the seconds in ``timings[name]``."""
    log.info("%s ...", name)
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    if timings is not None:
        timings[name] = timings.get(name, 0.0) + seconds
    log.info("%s done in %.2f s", name, seconds)


def release_freed_memory() -> None:
    """Hand memory that tensors have freed back to the operating system (glibc only).

    CPU tensors under glibc's mmap threshold (up to 32 MB once larger blocks have been freed:
    a layer's factor, eigenbasis or gradient) come from the heap, and glibc keeps freed heap
    pages resident: after a stage that made and dropped many of them (a K-FAC fit, preparing
    queries) the process stays at that stage's peak although nothing holds the memory, and
    the next stage adds its own peak on top. ``malloc_trim(0)`` returns those pages. Called
    between stages; a no-op where the C library has no ``malloc_trim``.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


DEFAULT_RUNTIME = Runtime()
SINGLE_PROCESS = DistContext()


def resolve_runtime(runtime: Runtime | None) -> Runtime:
    return DEFAULT_RUNTIME if runtime is None else runtime
