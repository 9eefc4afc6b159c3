"""Curvature-vector products and dense curvature blocks for one batch (pure tensor functions).

All functions take a flat parameter vector ``flat [p]`` and a function that maps it to what is
needed; they return SUMS over the batch (weighted by ``w [B]``); the caller divides by Σw.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, hessian, jacrev, jvp, vjp, vmap

FlatFn = Callable[[torch.Tensor], torch.Tensor]


def hessian_vector_products(total_loss: FlatFn, flat: torch.Tensor, vs: torch.Tensor):
    """``[k, p]`` rows ``∇²L(flat) v`` for a scalar function ``total_loss``."""
    def hvp(v):
        return jvp(grad(total_loss), (flat,), (v,))[1]
    return vmap(hvp)(vs)


def ggn_vector_products(outputs_fn: FlatFn, output_loss: Callable[[torch.Tensor], torch.Tensor],
                        flat: torch.Tensor, vs: torch.Tensor):
    """``[k, p]`` rows ``Jᵀ H_out J v``: J the Jacobian of ``outputs_fn`` at ``flat``, H_out the
    Hessian of the scalar ``output_loss`` (weighted sum of per-example losses) at the outputs."""
    outputs, pullback = vjp(outputs_fn, flat)

    def one(v):
        jv = jvp(outputs_fn, (flat,), (v,))[1]
        hjv = jvp(grad(output_loss), (outputs,), (jv,))[1]
        return pullback(hjv)[0]
    return vmap(one)(vs)


def dense_hessian(total_loss: FlatFn, flat: torch.Tensor) -> torch.Tensor:
    """``[p, p]`` Hessian of a scalar function."""
    return hessian(total_loss)(flat)


def dense_ggn(batch_outputs: FlatFn, loss_of_one: Callable, flat: torch.Tensor, targets,
              weights: torch.Tensor) -> torch.Tensor:
    """``[p, p]`` = Σ_i w_i J_iᵀ H_i J_i for one batch.

    ``batch_outputs(flat) -> [B, *out]`` (the model on the whole batch); ``loss_of_one(out,
    target) -> scalar``, the loss of ONE example from its outputs ``[*out]`` and its target (a
    row of ``targets``, a tensor or pytree of tensors with first dimension B). J (``[B, O, p]``)
    comes from reverse-mode products over the output coordinates of the whole batch, H_i
    (``[O, O]``) from ``vmap`` over examples of the loss alone — the model itself is never
    transformed per example.
    """
    outs = batch_outputs(flat).detach()
    jac = jacrev(batch_outputs)(flat)                                      # [B, *out, p]
    b = outs.shape[0]
    j = jac.reshape(b, -1, jac.shape[-1])
    o = j.shape[1]
    h = vmap(hessian(loss_of_one))(outs, targets).reshape(b, o, o)         # [B, O, O]
    hj = torch.bmm(h, j)
    return torch.einsum("bop,boq->pq", j * weights[:, None, None], hj)


def dense_outer(per_example_grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[p, p]`` = Σ_i w_i g_i g_iᵀ for ``per_example_grads [B, p]``."""
    return per_example_grads.T @ (per_example_grads * weights[:, None])


def outer_vector_products(per_example_grads: torch.Tensor, weights: torch.Tensor,
                          vs: torch.Tensor) -> torch.Tensor:
    """``[k, p]`` rows Σ_i w_i g_i (g_iᵀ v) without forming the matrix."""
    return ((vs @ per_example_grads.T) * weights) @ per_example_grads
