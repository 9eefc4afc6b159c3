"""Plan a run before starting it: memory and time of each stage, from a short calibration.

``influencekit.plan(target, sample, method=..., n_train=..., n_query=...)`` measures a few
primitives on this machine with the user's model and a handful of its examples
(:func:`calibrate`: per-example gradients, forward and backward passes, a GEMM, an
eigendecomposition, a top-k update), then estimates every stage of an influence run:

- ``fit``: the curvature statistics (dense ``[p, p]`` for ``method="flat"``; Kronecker factors,
  plus the eigenvalue-correction pass for EK-FAC);
- ``eigendecomposition``: of the dense curvature, or of every Kronecker factor;
- ``query_gradients``: query gradients and their preconditioning ``(C + λI)⁻¹ g_q``;
- ``train_gradients``: per-example training gradients (once per block of queries);
- ``scoring``: the score GEMMs and the running top-k (:func:`influencekit.scoring.stream_scores`).

Memory is the working memory a stage adds to the model and the data already loaded; time is
wall-clock on this machine with its current thread count. It suggests a batch size, a query
block size, a number of partitions and dtypes, and logs a warning for every stage whose memory
exceeds the budget. Estimates are meant to be within a factor of 2 (tested on small models).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import ConcatDataset, Subset

from .errors import InfluenceKitError, UnsupportedModuleError
from .grads import Layer, as_loader, find_layers, iter_gradients
from .inverse.kfac import FACTORED_KINDS
from .runtime import Runtime, resolve_runtime

logger = logging.getLogger("influencekit")

METHODS = ("flat", "kfac", "ekfac")
STAGES = ("fit", "eigendecomposition", "query_gradients", "train_gradients", "scoring")
_ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Calibration:
    """Rates measured on this machine (each the best of three runs).

    Attributes:
        gradient_seconds: per-example gradient, seconds per example.
        forward_seconds / backward_seconds: one forward pass with graph / one backward pass,
            seconds per example.
        gemm_flops: ``{dtype: floating-point operations per second}`` of a matrix product of
            the scoring shape.
        factor_flops: float64 operations per second of batched products of factor-sized
            matrices (K-FAC statistics and solves, dense curvature products).
        first_call_seconds: extra time of the first per-example gradient call of a process
            (tracing, allocations), counted once in the plan's total.
        eigh_seconds_per_cube: seconds of a float64 eigendecomposition divided by d³.
        topk_seconds: a running top-k update, seconds per score.
        statistics_seconds: K-FAC / EK-FAC statistics (all passes over the data), or the dense
            GGN of ``method="flat"`` (when ``p <= DENSE_CALIBRATION_PARAMS``), seconds per
            example, measured by fitting on one and on three batches (0 for a large flat p).
        activations: numbers produced by the model's leaf modules per example.
        outputs: model outputs per example (e.g. the number of classes).
        gradient_dtype: dtype of the gradients (the parameters' or the runtime's).
        solve_seconds: for ``method="kfac"`` / ``"ekfac"``: the fitted inverse's ``solve`` of
            query gradients, seconds per row (0: estimated from ``factor_flops``).
    """

    gradient_seconds: float
    forward_seconds: float
    backward_seconds: float
    gemm_flops: dict
    factor_flops: float
    first_call_seconds: float
    eigh_seconds_per_cube: float
    topk_seconds: float
    statistics_seconds: float
    activations: int
    outputs: int
    gradient_dtype: str
    solve_seconds: float = 0.0


@dataclass(frozen=True)
class StageEstimate:
    """One stage: estimated wall-clock ``seconds`` and working ``memory_bytes``."""

    name: str
    seconds: float
    memory_bytes: int
    detail: str = ""


@dataclass(frozen=True)
class Plan:
    """Estimates and suggestions for one run (see the module doc).

    Attributes:
        stages: one :class:`StageEstimate` per stage, in run order.
        batch_size: training examples per gradient / score block.
        query_block_size: queries preconditioned and held at once.
        partitions: jobs to split the run into (``Partition("i/n")``) to keep each under
            ``max_job_seconds``; 1 when no limit was given.
        score_dtype / store_dtype: suggested dtypes of the score GEMM and of the score store.
        store_bytes: size of the full ``[n_query, n_train]`` store in ``store_dtype``.
        memory_budget: bytes the estimates were checked against.
        warnings: the messages logged for stages over the budget.
    """

    stages: tuple[StageEstimate, ...]
    batch_size: int
    query_block_size: int
    partitions: int
    score_dtype: str
    store_dtype: str
    store_bytes: int
    memory_budget: int
    calibration: Calibration
    warnings: tuple[str, ...] = field(default=())

    def stage(self, name: str) -> StageEstimate:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    @property
    def total_seconds(self) -> float:
        """All stages plus the one-time start-up of the gradient computation."""
        return sum(s.seconds for s in self.stages) + self.calibration.first_call_seconds

    @property
    def peak_memory_bytes(self) -> int:
        return max(s.memory_bytes for s in self.stages)

    def __str__(self) -> str:
        lines = ["| stage | time | memory | detail |", "| --- | --- | --- | --- |"]
        for s in self.stages:
            lines.append(f"| {s.name} | {_seconds(s.seconds)} | {_bytes(s.memory_bytes)} | "
                         f"{s.detail} |")
        lines.append(f"\nbatch_size={self.batch_size} query_block_size={self.query_block_size} "
                     f"partitions={self.partitions} score_dtype={self.score_dtype} "
                     f"store_dtype={self.store_dtype} (store {_bytes(self.store_bytes)}), "
                     f"total {_seconds(self.total_seconds)}, memory budget "
                     f"{_bytes(self.memory_budget)}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def plan(target, sample, *, method: str = "flat", n_train: int, n_query: int,
         tokens_per_example: int = 1, kfac_labels: str = "exact", k: int | None = None,
         batch_size: int | None = None, query_block_size: int | None = None,
         score_dtype: str | None = None, store_dtype: str | None = None,
         memory_budget: int | None = None, disk_budget: int | None = None,
         max_job_seconds: float | None = None, runtime: Runtime | None = None,
         calibration: Calibration | None = None, calibration_repeats: int = 3) -> Plan:
    """Estimate memory and time of each stage of an influence run, and suggest settings.

    Args:
        target: the :class:`~influencekit.Target` (its parameter count and module shapes).
        sample: a few representative examples (data as elsewhere; 16-64 is plenty), used for
            the calibration (repeated to a full batch for the timings).
        method: ``"flat"`` (dense curvature, the Exact inverse), ``"kfac"`` or ``"ekfac"``.
        n_train, n_query: data sizes.
        tokens_per_example: positions per example a K-FAC layer sees (sequence length, conv
            output positions); 1 for plain ``[B, d]`` layers.
        kfac_labels: ``"exact"`` (one backward pass per model output) or ``"sampled"`` /
            ``"empirical"`` (one).
        k: top-k per query when scoring into a running top-k.
        batch_size / query_block_size / score_dtype / store_dtype: fix these instead of
            having them suggested.
        memory_budget: bytes of working memory (default: what this machine has available).
        disk_budget: bytes for the score store (default: free space in the current folder).
        max_job_seconds: split the run into partitions of at most this long.
        calibration: reuse ``earlier_plan.calibration`` (same model, batch size and method)
            instead of measuring again.
        calibration_repeats: timings are the best of this many runs.
    """
    if method not in METHODS:
        raise InfluenceKitError(f"method={method!r} is not one of {METHODS}.")
    for name, value in (("n_train", n_train), ("n_query", n_query),
                        ("tokens_per_example", tokens_per_example)):
        if int(value) < 1:
            raise InfluenceKitError(f"{name} must be at least 1, got {value}.")
    if score_dtype is not None and score_dtype not in _ITEMSIZE:
        raise InfluenceKitError(f"score_dtype {score_dtype!r} is not one of {sorted(_ITEMSIZE)}.")
    runtime = resolve_runtime(runtime)
    budget = int(memory_budget if memory_budget is not None else (available_memory() or 2**34))
    p = target.num_params
    layers = kfac_layers(target) if method != "flat" else []
    shape = _model_shape(target, sample, runtime)
    gradient_dtype = shape["gradient_dtype"]
    score_dtype = score_dtype or gradient_dtype
    qblock = query_block_size or _suggest_query_block(n_query, p, _ITEMSIZE[gradient_dtype],
                                                      budget)
    fit_jacobian = shape["outputs"] * shape["activations"] if method == "flat" else 0
    bsize = batch_size or _suggest_batch_size(p, shape["activations"], gradient_dtype, n_train,
                                              qblock, score_dtype, k, budget, fit_jacobian)
    cal = calibration or calibrate(target, sample, runtime, batch_size=bsize, query_rows=qblock,
                                   score_dtype=score_dtype, method=method,
                                   kfac_labels=kfac_labels, repeats=calibration_repeats)
    labels = cal.outputs if kfac_labels == "exact" else 1
    stages = (
        _fit_stage(method, p, n_train, bsize, layers, tokens_per_example, labels, cal),
        _eigh_stage(method, p, layers, cal),
        _query_stage(method, p, n_query, qblock, layers, cal),
        _train_stage(p, n_train, n_query, qblock, bsize, cal),
        _scoring_stage(p, n_train, n_query, qblock, bsize, score_dtype, k, cal),
    )
    store_dtype = store_dtype or _suggest_store_dtype(n_query, n_train, disk_budget)
    warnings = _check_budget(stages, budget)
    total = sum(s.seconds for s in stages)
    partitions = 1 if not max_job_seconds else max(1, math.ceil(total / max_job_seconds))
    return Plan(stages, bsize, qblock, min(partitions, n_train), score_dtype, store_dtype,
                n_query * n_train * _ITEMSIZE[store_dtype], budget, cal, tuple(warnings))


# -- calibration ------------------------------------------------------------------------------
def calibrate(target, sample, runtime: Runtime | None = None, *, batch_size: int = 64,
              query_rows: int = 64, score_dtype: str | None = None, method: str = "flat",
              kfac_labels: str = "exact", repeats: int = 3) -> Calibration:
    """Measure the rates the estimates are built from, each the best of ``repeats``.

    Timings use batches of ``batch_size`` examples (``sample`` repeated as needed), a GEMM of
    the scoring shape ``[query_rows, p] @ [p, batch_size]`` (p capped at 8192) and, for
    ``method="kfac"`` / ``"ekfac"``, the inverse itself fitted on one and on three batches (the
    difference is the statistics' cost of two batches, without the eigendecompositions); for
    ``method="flat"`` the dense GGN of one and of three batches of at most
    ``DENSE_CALIBRATION_BATCH`` examples when ``p`` is at most ``DENSE_CALIBRATION_PARAMS``
    (else a model from the forward/backward and GEMM rates).
    """
    runtime = resolve_runtime(runtime).replace(progress=False)
    shape = _model_shape(target, sample, runtime)
    data = _repeat_to(sample, runtime, batch_size)
    batch = next(iter(as_loader(data, runtime.replace(batch_size=batch_size))))
    n = _batch_rows(batch)
    grad_rt = runtime.replace(batch_size=n)
    first = time.perf_counter()
    grads = _best(lambda: [None for _ in iter_gradients(target, data, grad_rt)], repeats,
                  warm_up=False)
    first_call = max(0.0, time.perf_counter() - first - (repeats + 1) * grads)
    forward_s, backward_s = _forward_backward(target, batch, repeats)
    p = target.num_params
    dtypes = {"float64", shape["gradient_dtype"], score_dtype or shape["gradient_dtype"]}
    gemm = {name: _gemm_rate(min(query_rows, 256), min(p, 8192), min(n, 512),
                             getattr(torch, name), repeats) for name in sorted(dtypes)}
    layers = kfac_layers(target) if method != "flat" else []
    statistics, solve = 0.0, 0.0
    if method != "flat" or p <= DENSE_CALIBRATION_PARAMS:
        rows = n if method != "flat" else min(n, DENSE_CALIBRATION_BATCH)
        statistics, fitted = _statistics_rate(target, sample, runtime.replace(batch_size=rows),
                                              method, kfac_labels, repeats)
        if method != "flat":
            solve = _solve_rate(fitted, p, min(query_rows, 64), repeats)
    return Calibration(
        gradient_seconds=grads / n, forward_seconds=forward_s / n,
        backward_seconds=backward_s / n, gemm_flops=gemm,
        factor_flops=_factor_rate(max([lay.d_out for lay in layers] + [64]), repeats),
        first_call_seconds=first_call, eigh_seconds_per_cube=_eigh_rate(repeats),
        topk_seconds=_topk_rate(min(query_rows, 256), min(n, 1024), repeats),
        statistics_seconds=statistics, activations=shape["activations"],
        outputs=shape["outputs"], gradient_dtype=shape["gradient_dtype"], solve_seconds=solve)


DENSE_CALIBRATION_PARAMS = 4096
"""Largest p for which ``method="flat"`` is calibrated on a real dense curvature (128 MiB)."""
DENSE_CALIBRATION_BATCH = 128
"""Largest batch the dense curvature is calibrated on (its batched Jacobian's cost and memory
grow with the square of the batch)."""


def _statistics_rate(target, sample, runtime: Runtime, method: str, labels: str,
                     repeats: int) -> float:
    """``(seconds per example of the fit's passes over the data, the inverse fitted on one
    batch)`` (K-FAC / EK-FAC statistics, or the dense GGN; no inverse for it): three batches
    minus one, over two, so fixed costs and eigendecompositions cancel."""
    from .curvature import Curvature
    from .inverse import EKFAC, KFAC

    one = _repeat_to(sample, runtime, runtime.batch_size)
    three = _repeat_to(sample, runtime, 3 * runtime.batch_size)
    kind = "empirical_fisher" if labels == "empirical" else "ggn"
    cls = EKFAC if method == "ekfac" else KFAC

    def fit(data):
        if method == "flat":
            return lambda: Curvature(target, data, "ggn").dense(runtime)
        return lambda: cls(damping=1.0, labels=labels).fit(Curvature(target, data, kind),
                                                           runtime, stationarity=False)

    t_one = _best(fit(one), repeats)
    t_three = _best(fit(three), repeats)
    rate = max(t_three - t_one, 0.2 * t_one) / (2 * runtime.batch_size)
    return rate, (fit(one)() if method != "flat" else None)


def _solve_rate(inverse, p: int, rows: int, repeats: int) -> float:
    """Seconds per query row of the fitted inverse's ``solve`` (float32 gradients in)."""
    grads = torch.randn(rows, p, generator=torch.Generator().manual_seed(0))
    return _best(lambda: inverse.solve(grads), repeats) / rows


def _best(fn, repeats: int, warm_up: bool = True) -> float:
    """Best of ``repeats`` runs (after one warm-up run: allocations, lazy initialisation)."""
    if warm_up:
        fn()
    else:
        repeats += 1
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _model_shape(target, sample, runtime: Runtime) -> dict:
    """Outputs and leaf-module activations per example, and the gradients' dtype."""
    batch = next(iter(as_loader(sample, runtime.replace(batch_size=8), "calibration sample")))
    n = _batch_rows(batch)
    counts = []

    def count(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            counts.append(output.numel())

    leaves = [m for m in target.model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            out = target.outputs(target.params(), batch)
    finally:
        for h in handles:
            h.remove()
    dtype = runtime.dtype or next(iter(target.params().values())).dtype
    return {"activations": sum(counts) // n, "outputs": int(out[0].numel()) if out.dim() else 1,
            "gradient_dtype": str(dtype).replace("torch.", "")}


def _repeat_to(sample, runtime: Runtime, rows: int):
    """``sample`` repeated (and cut) to exactly ``rows`` examples."""
    if isinstance(sample, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in sample):
        n = sample[0].shape[0]
        index = torch.arange(rows) % n
        return tuple(t[index] for t in sample)
    dataset = as_loader(sample, runtime, "calibration sample").dataset
    n = len(dataset)
    return Subset(ConcatDataset([dataset] * math.ceil(rows / n)), range(rows))


def _forward_backward(target, batch, repeats: int):
    """Seconds of a forward pass with graph, and of the backward pass to every parameter."""
    params = {n: t.requires_grad_(True) for n, t in target.params().items()}
    leaves = list(params.values())

    def forward():
        return target.losses(params, batch).sum()

    def both():
        torch.autograd.grad(forward(), leaves)

    forward_s = _best(forward, repeats)
    return forward_s, max(_best(both, repeats) - forward_s, 0.0)


def _gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(m, k, dtype=torch.float32).to(dtype)
    b = torch.randn(n, k, dtype=torch.float32).to(dtype)
    seconds = _best(lambda: a @ b.T, repeats)
    return 2 * m * n * k / max(seconds, 1e-9)


def _factor_rate(d: int, repeats: int, batch: int = 16) -> float:
    d = min(d, 256)
    q = torch.randn(d, d, dtype=torch.float64)
    g = torch.randn(batch, d, d, dtype=torch.float64)
    return 2 * batch * d**3 / max(_best(lambda: q @ g, repeats), 1e-9)


def _eigh_rate(repeats: int, size: int = 256) -> float:
    m = torch.randn(size, size, dtype=torch.float64)
    m = m @ m.T
    return _best(lambda: torch.linalg.eigh(m), repeats) / size**3


def _topk_rate(rows: int, cols: int, repeats: int) -> float:
    from .scoring.topk import RunningTopK

    block = torch.randn(rows, cols, dtype=torch.float64)
    top = RunningTopK(rows, 10)
    return _best(lambda: top.update(block, 0), repeats) / block.numel()


def _batch_rows(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_rows(next(iter(batch.values())))
    return _batch_rows(batch[0])


# -- stages -----------------------------------------------------------------------------------
def kfac_layers(target) -> list[Layer]:
    """The layers K-FAC factors for the Target (``influencekit.grads.find_layers`` with the
    kinds of :class:`~influencekit.KFAC`: Linear, Conv2d, GPT-2 Conv1D): each layer's ``width``
    (input columns, +1 for a bias) and ``d_out``."""
    try:
        return find_layers(target, None, FACTORED_KINDS)
    except UnsupportedModuleError as exc:
        raise InfluenceKitError(f"K-FAC needs Linear or Conv layers for every selected "
                                f"parameter ({exc}); plan with method='flat', or restrict the "
                                "Target's parameters.") from exc


def _fit_stage(method, p, n, bsize, layers, tokens, labels, cal: Calibration) -> StageEstimate:
    rate64 = cal.gemm_flops["float64"]
    if method == "flat":
        # per example: a Jacobian (one backward pass per output) and its outer products
        per_example = (cal.forward_seconds + cal.outputs * cal.backward_seconds
                       + 2 * cal.outputs * p * p / rate64)
        jacobians = 2 * bsize * cal.outputs * p * 8
        # the batch's Jacobian comes from one backward pass batched over its B x outputs
        # coordinates: every activation of the batch, B x outputs times over
        batched = bsize * bsize * cal.outputs * cal.activations * _ITEMSIZE[cal.gradient_dtype]
        if cal.statistics_seconds > 0:  # measured on the dense curvature itself
            per_example = cal.statistics_seconds
        return StageEstimate("fit", n * per_example, 4 * p * p * 8 + jacobians + batched,
                             f"dense [p, p] curvature, p={p:,}")
    seconds = n * cal.statistics_seconds
    acts = bsize * tokens * sum(lay.width + lay.d_out for lay in layers) * 8
    memory = sum(lay.width**2 + lay.d_out**2 for lay in layers) * 8 + 3 * acts
    detail = f"{len(layers)} layers, {labels} backward pass(es) per example"
    if method == "ekfac":  # the eigenvalue-correction pass holds [B, d_out, width] products
        largest = max(lay.d_out * lay.width for lay in layers)
        memory = max(memory, 3 * bsize * largest * 8 + 2 * acts)
        detail += ", plus the eigenvalue-correction pass"
    return StageEstimate("fit", seconds, memory, detail)


def _eigh_stage(method, p, layers, cal: Calibration) -> StageEstimate:
    if method == "flat":
        return StageEstimate("eigendecomposition", cal.eigh_seconds_per_cube * p**3,
                             5 * p * p * 8, f"eigh of [{p}, {p}] float64")
    dims = [d for lay in layers for d in (lay.width, lay.d_out)]
    largest = max(d * d for d in dims)
    return StageEstimate("eigendecomposition", cal.eigh_seconds_per_cube * sum(d**3 for d in dims),
                         (sum(2 * d * d for d in dims) + 3 * largest) * 8,
                         f"{len(dims)} factors, largest {max(dims)}")


def _query_stage(method, p, n_query, qblock, layers, cal: Calibration) -> StageEstimate:
    if method == "flat":
        solve = 4 * n_query * p * p / cal.gemm_flops["float64"]
    elif cal.solve_seconds > 0:  # the fitted inverse's own solve, timed
        solve = n_query * cal.solve_seconds
    else:
        solve = sum(4 * n_query * lay.d_out * lay.width * (lay.d_out + lay.width)
                    for lay in layers) / cal.factor_flops
    gsize = _ITEMSIZE[cal.gradient_dtype]
    seconds = n_query * cal.gradient_seconds + solve
    memory = gradient_memory_bytes(p, qblock, cal.activations, gsize) + 3 * qblock * p * 8
    return StageEstimate("query_gradients", seconds, memory,
                         f"{n_query} queries in blocks of {qblock}, preconditioned in float64")


def _train_stage(p, n_train, n_query, qblock, bsize, cal: Calibration) -> StageEstimate:
    blocks = math.ceil(n_query / qblock)
    gsize = _ITEMSIZE[cal.gradient_dtype]
    memory = qblock * p * gsize + gradient_memory_bytes(p, bsize, cal.activations, gsize)
    return StageEstimate("train_gradients", blocks * n_train * cal.gradient_seconds, memory,
                         f"{n_train} examples x {blocks} query block(s), batch {bsize}")


def _scoring_stage(p, n_train, n_query, qblock, bsize, score_dtype, k,
                   cal: Calibration) -> StageEstimate:
    seconds = 2 * n_query * n_train * p / cal.gemm_flops[score_dtype]
    if k is not None:
        seconds += n_query * n_train * cal.topk_seconds
    memory = (scoring_memory_bytes(p, qblock, bsize, _ITEMSIZE[score_dtype], k)
              + bsize * p * _ITEMSIZE[cal.gradient_dtype])
    return StageEstimate("scoring", seconds, memory,
                         f"{n_query}x{n_train} scores, {score_dtype}"
                         + (f", top-{k}" if k else ""))


def gradient_memory_bytes(num_params: int, batch_size: int, activations: int,
                          itemsize: int) -> int:
    """Working memory of per-example gradients ``[B, p]``: two ``[B, p]`` buffers (the engine
    writes every layer's gradients straight into the block's flat buffer; the previous block is
    still held by its consumer while the next is computed) plus the activations of the
    backward pass."""
    return batch_size * (2 * num_params + 3 * activations) * itemsize


def scoring_memory_bytes(num_params: int, n_query: int, block_size: int, itemsize: int,
                         k: int | None = None) -> int:
    """Working memory of streaming scores: the preconditioned queries ``[n_query, p]``, one
    score block ``[n_query, B]`` (plus its float64 copy and sort buffers for a top-k) and the
    top-k state."""
    memory = n_query * num_params * itemsize + n_query * block_size * itemsize
    if k is not None:
        memory += n_query * block_size * 8 * 3 + n_query * k * 4 * 16
    return memory


# -- suggestions ------------------------------------------------------------------------------
def _suggest_query_block(n_query: int, p: int, itemsize: int, budget: int) -> int:
    fits = max(1, budget // 4 // (3 * p * max(itemsize, 8)))
    return int(min(n_query, fits))


def _suggest_batch_size(p, activations, gradient_dtype, n_train, qblock, score_dtype, k,
                        budget, fit_jacobian: int = 0) -> int:
    """The largest power of two up to 1024 whose gradients and scores (and, for the flat fit,
    the batched Jacobian: ``B² × fit_jacobian`` numbers) take at most half the budget."""
    bsize = 1
    for candidate in (2**i for i in range(11)):
        if candidate > n_train:
            break
        need = (gradient_memory_bytes(p, candidate, activations, _ITEMSIZE[gradient_dtype])
                + scoring_memory_bytes(p, qblock, candidate, _ITEMSIZE[score_dtype], k)
                + candidate * candidate * fit_jacobian * _ITEMSIZE[gradient_dtype])
        if need > budget // 2:
            break
        bsize = candidate
    return bsize


def _suggest_store_dtype(n_query: int, n_train: int, disk_budget: int | None) -> str:
    if disk_budget is None:
        disk_budget = shutil.disk_usage(os.getcwd()).free
    return "float32" if n_query * n_train * 4 <= disk_budget else "bfloat16"


def _check_budget(stages, budget: int) -> list[str]:
    warnings = []
    for s in stages:
        if s.memory_bytes > budget:
            message = (f"stage {s.name!r} needs about {_bytes(s.memory_bytes)}, above the memory "
                       f"budget of {_bytes(budget)} ({s.detail}); use a smaller batch size or "
                       "query block, a factored method (kfac/ekfac), or more partitions.")
            logger.warning(message)
            warnings.append(message)
    return warnings


def available_memory() -> int | None:
    """Bytes of memory available on this machine (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _seconds(s: float) -> str:
    if s < 120:
        return f"{s:.2f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
