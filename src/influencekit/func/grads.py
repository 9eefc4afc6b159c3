"""Per-example gradients of a per-example function, with torch.func and with a plain loop.

``fn(params, batch) -> [B]`` maps a dict of parameters and a batch (a tensor, or a tuple / dict of
tensors whose first dimension is the batch) to one value per example. The vmap version is the fast
path; the loop is the test oracle. Both return ``(values [B], {name: [B, *shape]})``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_map

PerExampleFn = Callable[[dict[str, torch.Tensor], object], torch.Tensor]


def _single(fn: PerExampleFn):
    def one(params, example):
        batch_of_one = tree_map(lambda t: t.unsqueeze(0), example)
        return fn(params, batch_of_one)[0]

    return one


def per_example_gradients(fn: PerExampleFn, params: dict[str, torch.Tensor], batch,
                          chunk_size: int | None = None):
    """∇θ fn for each example of ``batch`` with ``torch.func.vmap``; see module docstring."""
    grads, values = vmap(grad_and_value(_single(fn)), in_dims=(None, 0),
                         chunk_size=chunk_size)(params, batch)
    return values, grads


def per_example_gradients_loop(fn: PerExampleFn, params: dict[str, torch.Tensor], batch):
    """The same as :func:`per_example_gradients`, one backward pass per example (test oracle)."""
    size = _batch_size(batch)
    values, grads = [], {n: [] for n in params}
    for i in range(size):
        example = tree_map(lambda t, i=i: t[i:i + 1], batch)
        live = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        value = fn(live, example)[0]
        gs = torch.autograd.grad(value, list(live.values()), allow_unused=True)
        values.append(value.detach())
        for (n, p), g in zip(live.items(), gs, strict=True):
            grads[n].append(torch.zeros_like(p) if g is None else g)
    return torch.stack(values), {n: torch.stack(v) for n, v in grads.items()}


def _batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    return _batch_size(batch[0])
