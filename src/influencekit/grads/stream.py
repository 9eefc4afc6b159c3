"""Dataset-scale gradients: per-example training-loss and measurement gradients ``[n, p]``."""

from __future__ import annotations

import torch

from ..errors import NonFiniteError
from ..func.grads import per_example_gradients
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target
from .data import as_loader, batches


def compute_dtype(target: Target, runtime: Runtime) -> torch.dtype:
    if runtime.dtype is not None:
        return runtime.dtype
    return next(iter(target.params().values())).dtype


def iter_gradients(target: Target, data, runtime: Runtime | None = None, *,
                   which: str = "loss", params: dict[str, torch.Tensor] | None = None,
                   desc: str = "gradients"):
    """Yield ``(start, grads [B, p])`` in data-set order.

    ``which="loss"``: training gradients ``g_m = ∇ℓ(z_m) + ∇R`` (the regulariser gradient is added
    to every row, as the conventions table prescribes for a weighted-mean loss);
    ``which="measurement"``: query gradients ``g_q = ∇f(z_q)``.
    Raises :class:`NonFiniteError` naming the first example whose value or gradient is not finite.
    """
    runtime = resolve_runtime(runtime)
    dtype = compute_dtype(target, runtime)
    if params is None:
        params = target.params(dtype, runtime.device)
    fn = target.losses if which == "loss" else target.measurements
    reg_grad = _regularizer_gradient(target, params) if which == "loss" else None
    loader = as_loader(data, runtime, "query data" if which == "measurement" else "training data")
    for start, batch, _ in batches(loader, runtime, dtype, desc=desc):
        if start == 0:
            with torch.no_grad():  # shape check on the whole first batch (vmap sees one example)
                fn(params, batch)
        values, grads = per_example_gradients(fn, params, batch)
        flat = target.space.flatten(grads, batch_dims=1)
        check_finite(values, flat, start, which)
        if reg_grad is not None:
            flat = flat + reg_grad
        yield start, flat


def gradients(target: Target, data, runtime: Runtime | None = None, **kwargs) -> torch.Tensor:
    """All of :func:`iter_gradients` stacked: ``[n, p]``."""
    return torch.cat([g for _, g in iter_gradients(target, data, runtime, **kwargs)])


def _regularizer_gradient(target: Target, params) -> torch.Tensor | None:
    if target.regularizer is None:
        return None
    g = torch.func.grad(target.regularization)(params)
    return target.space.flatten(g)


def check_finite(values: torch.Tensor, flat_grads: torch.Tensor, start: int, which: str):
    bad_value = ~torch.isfinite(values)
    bad_grad = ~torch.isfinite(flat_grads).all(dim=1)
    bad = bad_value | bad_grad
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        what = "value" if bad_value[i] else "gradient"
        raise NonFiniteError(
            f"the {which} {what} of example {start + i} is not finite "
            f"({values[i].item()}). Check that example's inputs and label, the model's "
            "numerics (e.g. log of 0), or compute in float64 with Runtime(dtype=torch.float64).",
            index=start + i)
