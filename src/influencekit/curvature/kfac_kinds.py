"""K-FAC statistics of layers beyond Linear / Conv: embeddings and LayerNorm / RMSNorm.

Embedding (``nn.Embedding``, one-hot inputs): the activation factor of a one-hot input is
DIAGONAL, ``A = diag(a)`` with ``a[v] = (1/Σw) Σ_i w_i (1/T_i) #{t : id_it = v}`` (real tokens
only; the padding index never reaches the weight), so it is kept as a ``[V]`` vector — never a
``V × V`` matrix — and its eigenbasis is the identity. The output-gradient factor ``S [d, d]`` is
the usual one. EK-FAC's correction in the basis ``Q_S ⊗ I`` is
``Λ[o, v] = (1/Σw) Σ_i w_i E_y[(Σ_{t: id_it = v} (Q_Sᵀ δ_it)_o)²]``, accumulated from the rotated
output gradients of each (example, token id) pair — ``O(B·T·d)`` per batch, no ``[B, V, d]``.

LayerNorm / RMSNorm: the weight and bias gradients ``g = [Σ_t δ_t ⊙ x̂_t ; Σ_t δ_t]`` (``m`` =
d or 2d numbers) get their EXACT block ``(1/Σw) Σ_i w_i E_y[g_i g_iᵀ]`` (``m × m``), or its
diagonal when the block does not fit the memory budget. In the layout of K-FAC's solve this is
a "Kronecker" layer with ``d_out = m``, ``width = 1``, ``A = [[1]]`` and ``S`` = the block.

All sums are float64 and weighted like :mod:`influencekit.curvature.kfac`'s (divide by Σw).
"""

from __future__ import annotations

import torch

from ..grads import normalized_inputs

F64 = torch.float64


def embedding_ids(module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, T]`` token ids of an embedding's input, ``-1`` where the token is masked or is the
    padding index (those tokens add nothing to the weight's gradient)."""
    ids = x.reshape(x.shape[0], -1).long()
    drop = torch.zeros_like(ids, dtype=torch.bool)
    if module.padding_idx is not None:
        drop |= ids == module.padding_idx
    if mask is not None and mask.shape == ids.shape:
        drop |= ~mask.to(device=ids.device, dtype=torch.bool)
    return ids.masked_fill(drop, -1)


def embedding_factor_sum(ids: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                         vocabulary: int) -> torch.Tensor:
    """``[V]``: ``Σ_i w_i (1/T_i) #{t : id_it = v}`` of one batch (ids ``-1`` are skipped)."""
    scale = (weights.to(F64) / counts.to(F64))[:, None].expand_as(ids)
    keep = ids >= 0
    out = torch.zeros(vocabulary, dtype=F64, device=ids.device)
    return out.index_add_(0, ids[keep], scale[keep])


def embedding_correction_sum(ids: torch.Tensor, rotated: torch.Tensor, coef: torch.Tensor,
                             vocabulary: int) -> torch.Tensor:
    """``[d, V]``: ``Σ_i coef_i Σ_v (Σ_{t: id_it = v} r_it)²`` of one batch, ``r = Q_Sᵀ δ``
    ``[B, T, d]`` (the squared per-example gradient column of each id, in the S eigenbasis)."""
    size, length, d = rotated.shape
    keep = ids >= 0
    example = torch.arange(size, device=ids.device)[:, None].expand(size, length)
    keys = (example * vocabulary + ids)[keep]
    unique, position = torch.unique(keys, return_inverse=True)
    columns = torch.zeros(unique.shape[0], d, dtype=F64, device=rotated.device)
    columns.index_add_(0, position, rotated[keep].to(F64))
    weighted = columns ** 2 * coef.to(F64)[unique // vocabulary][:, None]
    out = torch.zeros(vocabulary, d, dtype=F64, device=rotated.device)
    out.index_add_(0, unique % vocabulary, weighted)
    return out.T


def norm_gradients(layer, xhat: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``[B, m]`` per-example gradients of a norm's selected weight and bias (weight first),
    from the normalised inputs ``x̂`` and output gradients ``δ`` ``[B, T, d]`` (masked)."""
    parts = []
    if layer.weight:
        parts.append((delta * xhat).sum(dim=1))
    if layer.bias:
        parts.append(delta.sum(dim=1))
    return torch.cat(parts, dim=1)


def norm_block_sum(grads: torch.Tensor, coef: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """``Σ_i coef_i g_i g_iᵀ`` ``[m, m]`` (or its diagonal ``[m]``) of one batch."""
    g = grads.to(F64)
    if diagonal:
        return (coef.to(F64)[:, None] * g ** 2).sum(dim=0)
    return (g * coef.to(F64)[:, None]).T @ g


# -- one statistics pass: the hooks of curvature/kfac.py call these for the kinds above ---------
#: Kinds whose K-FAC statistics are computed here (the rest: Linear / Conv, in curvature/kfac.py).
KINDS = ("embedding", "layernorm", "rmsnorm")
NORM_KINDS = ("layernorm", "rmsnorm")

#: A norm layer's block ``[m, m]`` is exact while m (selected weight + bias entries) is at most
#: this; above, only its diagonal ``[m]`` is kept (m² float64 numbers would not be small).
NORM_EXACT_LIMIT = 4096


def norm_size(layer) -> int:
    """``m``: the number of a norm layer's selected parameters (weight first, then bias)."""
    return layer.d_in * ((1 if layer.weight else 0) + (1 if layer.bias else 0))


def norm_is_diagonal(layer) -> bool:
    """Whether a norm layer keeps only the diagonal of its block (m > NORM_EXACT_LIMIT)."""
    return norm_size(layer) > NORM_EXACT_LIMIT


def factor_zeros(layer, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero sums ``(A, S)`` of one layer of these kinds: an embedding's ``A [V]`` (diagonal)
    and ``S [d, d]``; a norm's ``A [1, 1]`` (Σw) and ``S [m, m]`` (or ``[m]`` when diagonal)."""
    if layer.kind == "embedding":
        return (torch.zeros(layer.d_in, dtype=F64, device=device),
                torch.zeros(layer.d_out, layer.d_out, dtype=F64, device=device))
    m = norm_size(layer)
    shape = (m,) if norm_is_diagonal(layer) else (m, m)
    return torch.zeros(1, 1, dtype=F64, device=device), torch.zeros(shape, dtype=F64,
                                                                     device=device)


def correction_zeros(layer, device) -> torch.Tensor:
    """Zero EK-FAC correction sums: ``[d, V]`` (embedding) or ``[m, 1]`` (norm)."""
    if layer.kind == "embedding":
        return torch.zeros(layer.d_out, layer.d_in, dtype=F64, device=device)
    return torch.zeros(norm_size(layer), 1, dtype=F64, device=device)


def statistic_inputs(layer, module, x: torch.Tensor, mask: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input, token mask [B, T, 1] float64 or None)`` of one hooked batch: an embedding's
    ids ``[B, T]`` (``-1`` for masked and padding tokens, which the mask also drops from the
    output gradients); a norm's normalised inputs ``x̂ [B, T, d]`` float64, masked tokens
    zeroed."""
    if layer.kind == "embedding":
        ids = embedding_ids(module, x, mask)
        return ids, (ids >= 0).to(F64)[..., None]
    xhat = normalized_inputs(layer, module, x).to(F64)
    if mask is None or mask.shape[1] != xhat.shape[1]:
        return xhat, None
    keep = mask.to(device=xhat.device, dtype=F64)[..., None]
    return xhat * keep, keep


def add_factor_a(layer, inputs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                 into: torch.Tensor) -> None:
    """Add one batch to the sum behind A (``w [B]``, ``counts`` = real tokens ``[B]``)."""
    if layer.kind == "embedding":
        into += embedding_factor_sum(inputs, w, counts, layer.d_in)
    else:
        into += w.to(F64).sum()


def add_factor_s(layer, inputs: torch.Tensor, g: torch.Tensor, coef: torch.Tensor,
                 into: torch.Tensor) -> None:
    """Add one label set of one batch to the sum behind S (``g [B, T, d_out]``, masked)."""
    if layer.kind == "embedding":
        into += torch.einsum("bto,btp->op", g * coef.to(F64)[:, None, None], g)
    else:
        into += norm_block_sum(norm_gradients(layer, inputs, g), coef, into.dim() == 1)


def add_correction(layer, inputs: torch.Tensor, g: torch.Tensor, coef: torch.Tensor,
                   s_vectors: torch.Tensor, into: torch.Tensor) -> None:
    """Add one label set of one batch to the EK-FAC correction sums ``Σ_i coef_i (Q_Sᵀ G_i)²``
    (``s_vectors`` empty: Q_S is the identity, a diagonal norm block)."""
    if layer.kind == "embedding":
        into += embedding_correction_sum(inputs, g @ s_vectors, coef, layer.d_in)
        return
    grads = norm_gradients(layer, inputs, g)
    if s_vectors.numel():
        grads = grads @ s_vectors
    into += (coef.to(F64)[:, None] * grads ** 2).sum(dim=0)[:, None]
