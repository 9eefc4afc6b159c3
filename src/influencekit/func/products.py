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


def dense_ggn(per_example_outputs: Callable, per_example_output_loss: Callable,
              flat: torch.Tensor, examples, weights: torch.Tensor) -> torch.Tensor:
    """``[p, p]`` = Σ_i w_i J_iᵀ H_i J_i.

    ``per_example_outputs(flat, example) -> outputs`` of one example (any shape, flattened to O);
    ``per_example_output_loss(outputs, example) -> scalar`` loss of one example from its outputs.
    """
    jac = vmap(jacrev(per_example_outputs), in_dims=(None, 0))(flat, examples)  # [B, *out, p]
    outs = vmap(per_example_outputs, in_dims=(None, 0))(flat, examples)          # [B, *out]
    h_out = vmap(hessian(per_example_output_loss))(outs, examples)              # [B, *out, *out]
    b = jac.shape[0]
    j = jac.reshape(b, -1, jac.shape[-1])
    o = j.shape[1]
    h = h_out.reshape(b, o, o)
    hj = torch.bmm(h, j)
    return torch.einsum("bop,boq->pq", j * weights[:, None, None], hj)


def dense_outer(per_example_grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[p, p]`` = Σ_i w_i g_i g_iᵀ for ``per_example_grads [B, p]``."""
    return per_example_grads.T @ (per_example_grads * weights[:, None])


def outer_vector_products(per_example_grads: torch.Tensor, weights: torch.Tensor,
                          vs: torch.Tensor) -> torch.Tensor:
    """``[k, p]`` rows Σ_i w_i g_i (g_iᵀ v) without forming the matrix."""
    return ((vs @ per_example_grads.T) * weights) @ per_example_grads
