"""Dataset-scale gradients: per-example training-loss and measurement gradients ``[n, p]``."""

from __future__ import annotations

import torch

from ..errors import NonFiniteError
from ..runtime import Runtime, resolve_runtime
from .data import as_loader, iter_batches
from .engine import Differentiated, GradientEngine


def compute_dtype(target, runtime: Runtime) -> torch.dtype:
    """The dtype gradients are computed in: the runtime's, else the parameters'."""
    if runtime.dtype is not None:
        return runtime.dtype
    return next(iter(target.params().values())).dtype


def iter_gradients(target, data, runtime: Runtime | None = None, *,
                   of: Differentiated = "loss", params: dict[str, torch.Tensor] | None = None,
                   include_regularizer: bool | None = None, reuse: bool = False,
                   desc: str = "gradients"):
    """Yield ``(start, grads [B, p])`` in data-set order (see :func:`iter_values_and_gradients`).
    """
    for start, _, flat in iter_values_and_gradients(
            target, data, runtime, of=of, params=params,
            include_regularizer=include_regularizer, reuse=reuse, desc=desc):
        yield start, flat


def iter_values_and_gradients(target, data, runtime: Runtime | None = None, *,
                              of: Differentiated = "loss",
                              params: dict[str, torch.Tensor] | None = None,
                              include_regularizer: bool | None = None, reuse: bool = False,
                              desc: str = "gradients"):
    """Yield ``(start, values [B], grads [B, p])`` in data-set order.

    ``of="loss"``: training gradients ``g_m = ∇ℓ(z_m) + ∇R`` (the regulariser gradient is added
    to every row, as the conventions table prescribes for a weighted-mean loss);
    ``of="measurement"``: query gradients ``g_q = ∇f(z_q)``; a function
    ``(outputs, targets) -> [B]``: its gradients. ``include_regularizer`` overrides whether ∇R is
    added (default: only for ``"loss"``). ``reuse=True``: every block is written into the same
    buffer, overwritten by the next one — for consumers that use a block before advancing (it
    saves a fresh ``[B, p]`` allocation per batch).
    Computed by the runtime's gradient engine (:class:`~influencekit.grads.GradientEngine`).
    Raises :class:`NonFiniteError` naming the first example whose value or gradient is not finite.
    """
    runtime = resolve_runtime(runtime)
    dtype = compute_dtype(target, runtime)
    if params is None:
        params = target.params(dtype, runtime.device)
    engine = GradientEngine(target, runtime.engine)
    if include_regularizer is None:
        include_regularizer = of == "loss"
    reg_grad = regularizer_gradient(target, params) if include_regularizer else None
    what = "training data" if of == "loss" else "query data"
    buffer = None
    for start, batch, _ in iter_batches(as_loader(data, runtime, what), runtime, dtype,
                                        desc=desc):
        values, flat = engine.flat(params, batch, of, out=buffer)
        buffer = flat if reuse else None
        check_finite(values, flat, start, of if isinstance(of, str) else "value")
        if reg_grad is not None:
            flat += reg_grad
        yield start, values, flat


def gradients(target, data, runtime: Runtime | None = None, **kwargs) -> torch.Tensor:
    """All of :func:`iter_gradients` stacked: ``[n, p]``."""
    return torch.cat([g for _, g in iter_gradients(target, data, runtime, **kwargs)])


def regularizer_gradient(target, params) -> torch.Tensor | None:
    """∇R at ``params`` as a flat ``[p]`` vector (None without a regulariser)."""
    if target.regularizer is None:
        return None
    g = torch.func.grad(target.regularization)(params)
    return target.space.flatten(g)


def check_finite(values: torch.Tensor, flat_grads: torch.Tensor, start: int, what: str):
    """Raise :class:`NonFiniteError` naming the first example (``start`` + row) whose value or
    gradient row is NaN or infinite. A row is checked through its sum (one reduction instead of
    a test per entry); only a failing batch is inspected entry by entry."""
    bad_value = ~torch.isfinite(values)
    bad_grad = ~torch.isfinite(flat_grads.sum(dim=1))
    bad = bad_value | bad_grad
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        kind = "value" if bad_value[i] else "gradient"
        raise NonFiniteError(
            f"the {what} {kind} of example {start + i} is not finite "
            f"({values[i].item()}). Check that example's inputs and label, the model's "
            "numerics (e.g. log of 0), or compute in float64 with Runtime(dtype=torch.float64).",
            index=start + i)
