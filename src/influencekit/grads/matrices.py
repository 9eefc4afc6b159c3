"""A layer's parameters as one gradient matrix, and back.

Every Kronecker layer (:data:`~influencekit.grads.KRONECKER_KINDS`) sees its weight and bias as
one matrix in the layout ``[d_out, width]``: weight row o (in the ``[d_out, d_in]`` orientation,
transposed from storage for GPT-2's ``Conv1D`` and ``nn.Embedding``) followed by bias entry o
(see :mod:`influencekit.grads.layers`). Per-example gradients, preconditioned queries and
projections are all handled in that layout; these two functions convert a per-parameter dict
``{name: [k, *shape]}`` to ``[k, d_out, width]`` and back, without flat ``[k, p]`` vectors.
"""

from __future__ import annotations

import torch

from .layers import Layer


def layer_matrix(layer: Layer, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[k, d_out, width]``: the layer's weight and bias entries of ``tensors``
    (``{parameter name: [k, *shape]}``) in the layer's gradient-matrix layout."""
    if not layer.kronecker:
        raise ValueError(f"layer {layer.name!r} of kind {layer.kind!r} has no gradient matrix "
                         "(only Kronecker kinds do)")
    parts = []
    if layer.weight:
        w = tensors[layer.weight]
        k = w.shape[0]
        if layer.transposed:
            parts.append(w.reshape(k, layer.d_in, layer.d_out).transpose(1, 2))
        else:
            parts.append(w.reshape(k, layer.d_out, layer.d_in))
    if layer.bias:
        b = tensors[layer.bias]
        parts.append(b.reshape(b.shape[0], layer.d_out, 1))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def layer_parameters(layer: Layer, matrix: torch.Tensor,
                     shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`layer_matrix`: ``matrix [k, d_out, width]`` split into
    ``{weight name: [k, *shape], bias name: [k, *shape]}`` (contiguous tensors)."""
    k = matrix.shape[0]
    out = {}
    if layer.weight:
        w = matrix[:, :, :layer.d_in]
        if layer.transposed:
            w = w.transpose(1, 2)
        out[layer.weight] = w.reshape(k, *shapes[layer.weight]).contiguous()
    if layer.bias:
        out[layer.bias] = matrix[:, :, -1].reshape(k, *shapes[layer.bias]).contiguous()
    return out
