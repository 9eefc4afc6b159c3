"""Sums over the training data: split over processes, and resumable in chunks.

Every curvature statistic is a weighted sum over training examples divided by their summed
weight (``C = (1/Σw) Σ_i w_i C_i``). :func:`accumulate` computes such sums on the data's batch
grid (batch ``b`` holds examples ``b·B ... (b+1)·B - 1``, B the batch size of the data's
loader), three ways that agree to rounding:

- one process, no store: one pass over every batch;
- several processes (``Runtime.context``): process r sums its contiguous share of the batches;
  the sums, Σw and the number of examples are then all-reduced, so every process holds the
  totals (float64 sums are reduced in float64);
- a :class:`~influencekit.storage.FitStore`: the batches are cut into chunks; each process
  computes the chunks of its share that are not done yet and writes each as one checksummed row;
  then every process adds all rows in chunk order. A fit killed at any point resumes from the
  chunks written and ends with the same bits as an uninterrupted one (with any number of
  processes: the rows and their order do not depend on who computed them).

The number of examples covered is checked against the data's (a process given other data than
the others raises :class:`~influencekit.errors.DistributedError`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import DistributedError
from ..grads import check_weights
from ..runtime import Runtime
from ..storage import FitStore, data_fingerprint, fingerprint

F64 = torch.float64


@dataclass
class Sums:
    """What :func:`accumulate` returns, identical on every process.

    Attributes:
        values: ``{name: tensor}`` summed over all training examples (each weighted).
        weight: Σw over all training examples (the n of the conventions table).
        examples: the number of training examples covered (the data's, checked).
    """

    values: dict[str, torch.Tensor]
    weight: float
    examples: int


Zeros = Callable[[], dict[str, torch.Tensor]]
Add = Callable[[range, dict[str, torch.Tensor]], float]


def accumulate(curvature, runtime: Runtime, zeros: Zeros, add: Add, *,
               store: FitStore | None = None, name: str = "statistics",
               config: dict | None = None) -> Sums:
    """Sum a statistic over the training data of ``curvature`` (see the module docstring).

    Args:
        zeros: returns fresh zero sums ``{name: tensor}`` (their shapes, dtypes and device).
        add: ``add(rows, sums)`` adds the examples ``rows`` (a contiguous range of positions,
            whole batches) into ``sums`` in place and returns their Σw.
        store: a FitStore: write one row per chunk under ``store.folder / name`` (float64).
        config: what the statistic depends on besides the data (recorded by the store with
            :func:`store_config`'s entries, and compared when it is reopened).
    """
    n = curvature.num_examples(runtime)
    grid = curvature.batch_grid(runtime)
    n_batches = math.ceil(n / grid)
    if store is None:
        result = _accumulate_shards(runtime, zeros, add, n, grid, n_batches)
    else:
        result = _accumulate_chunks(curvature, runtime, zeros, add, store, name,
                                    dict(config or {}), n, grid, n_batches)
    if result.examples != n:
        raise DistributedError(
            f"the {runtime.dist.world_size} processes covered {result.examples} training "
            f"examples, but the data hold {n}: every process must be given the same training "
            "data (the whole set; each takes its own share).")
    return result


def example_rows(batches: range, grid: int, n: int) -> range:
    """The examples of the batches ``batches`` (the last batch may be short)."""
    return range(min(batches.start * grid, n), min(batches.stop * grid, n))


def store_config(curvature, runtime: Runtime, dtype: torch.dtype) -> dict:
    """What a stored statistic depends on through the data and the model: the curvature kind,
    the selected parameters, fingerprints of the whole model (every parameter and buffer, also
    those not selected), of the data and of the weights, and the dtype it is computed in."""
    weights = check_weights(curvature.weights, curvature.num_examples(runtime), runtime)
    model = dict(curvature.target.model.state_dict(keep_vars=False))
    return {"kind": curvature.kind, "params": list(curvature.target.space.names),
            "model_fingerprint": fingerprint(model),
            "data_fingerprint": data_fingerprint(curvature.data),
            "weights": None if weights is None else fingerprint(weights.to(F64)),
            "dtype": str(dtype).replace("torch.", "")}


# -- the two ways ---------------------------------------------------------------------------
def _accumulate_shards(runtime, zeros, add, n, grid, n_batches) -> Sums:
    dist = runtime.dist
    rows = example_rows(dist.shard(n_batches), grid, n)
    sums = zeros()
    weight = add(rows, sums) if len(rows) else 0.0
    totals = torch.tensor([weight], dtype=F64)
    count = torch.tensor([len(rows)], dtype=torch.int64)
    dist.all_reduce_sum_([*sums.values(), totals, count])
    return Sums(sums, float(totals[0]), int(count[0]))


def _accumulate_chunks(curvature, runtime, zeros, add, store, name, config, n, grid,
                       n_batches) -> Sums:
    dist = runtime.dist
    per_chunk = store.chunk_batches(name, grid, n_batches, dist.world_size)
    n_chunks = math.ceil(n_batches / per_chunk)
    layout = [(key, t.shape, t.dtype, t.device) for key, t in zeros().items()]
    length = sum(math.prod(shape) for _, shape, _, _ in layout) + 2
    config.update(statistic=name, n_examples=n, batch_size=grid, chunk_batches=per_chunk)
    array = _open_everywhere(store, dist, name, n_chunks, length, config)
    done = array.done()
    for chunk in dist.shard(n_chunks):
        if done[chunk]:
            continue
        rows = example_rows(range(chunk * per_chunk, (chunk + 1) * per_chunk), grid, n)
        sums = zeros()
        weight = add(rows, sums)
        array.write(chunk, _flatten(sums, weight, len(rows)).numpy())
    array.close()
    dist.barrier()  # every chunk is on disk now
    totals = zeros()
    weight, examples = 0.0, 0
    for chunk in range(n_chunks):
        row = torch.from_numpy(array.read_row(chunk))
        offset = 0
        for key, shape, dtype, device in layout:
            size = math.prod(shape)
            totals[key] += row[offset:offset + size].view(shape).to(device=device, dtype=dtype)
            offset += size
        weight += float(row[-2])
        examples += int(row[-1])
    return Sums(totals, weight, examples)


def _open_everywhere(store, dist, name, n_chunks, length, config):
    """Open the pass's array on the main process first (it creates it), then on the others;
    a refusal on the main process is raised on every process."""
    error = None
    if dist.is_main:
        try:
            store.pass_array(name, n_chunks, length, config).close()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others learn of it
            error = exc
    failed = dist.sum(int(error is not None))
    if error is not None:
        raise error
    if failed:
        raise DistributedError(f"the main process could not open the fit store "
                               f"{store.folder / name} (see its error).")
    return store.pass_array(name, n_chunks, length, config)


def _flatten(sums: dict[str, torch.Tensor], weight: float, examples: int) -> torch.Tensor:
    parts = [t.detach().to(device="cpu", dtype=F64).reshape(-1) for t in sums.values()]
    return torch.cat(parts + [torch.tensor([weight, float(examples)], dtype=F64)])
