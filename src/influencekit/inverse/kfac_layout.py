"""Each K-FAC / EK-FAC layer as a ``[rows, cols]`` matrix with a basis ``Q_S ⊗ Q_A``.

- Linear / Conv2d / Conv1D / Embedding: the gradient-matrix layout ``[d_out, width]`` of
  :mod:`influencekit.grads.layers` (an embedding: ``[d, V]``, its weight stored transposed).
- LayerNorm / RMSNorm: the selected weight and bias as one column ``[m, 1]`` (weight entries
  first), with ``A = [[1]]`` and ``S`` = the layer's exact curvature block ``[m, m]`` (see
  :mod:`influencekit.curvature.kfac_kinds`).

A factor kept as its diagonal (an embedding's A ``[V]``, a large norm's S ``[m]``) has the
identity as its eigenbasis; it is stored as an EMPTY tensor (``numel() == 0``), never as a
``V × V`` identity, and every product below skips it.
"""

from __future__ import annotations

import torch

from ..curvature.kfac_kinds import NORM_KINDS, norm_size
from ..errors import InfluenceKitError, UnsupportedModuleError
from ..func.params import ParamSpace
from ..grads import Layer, find_layers, layer_index, layer_matrix, layer_parameters

F64 = torch.float64

#: The kinds K-FAC / EK-FAC factor by default.
FACTORED_KINDS = ("linear", "conv2d", "conv1d")
#: Every kind they can factor, with ``kinds="all"``.
ALL_KINDS = FACTORED_KINDS + ("embedding", "layernorm", "rmsnorm")


def resolve_kinds(kinds: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The layer kinds of a ``kinds=`` argument: None = :data:`FACTORED_KINDS`, ``"all"`` =
    :data:`ALL_KINDS`, else the named kinds (one name or a list)."""
    if kinds is None:
        return FACTORED_KINDS
    if kinds == "all":
        return ALL_KINDS
    names = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in names if k not in ALL_KINDS]
    if unknown or not names:
        raise InfluenceKitError(
            f"kinds={kinds!r}: K-FAC factors the layer kinds {list(ALL_KINDS)}; name some of "
            "them (e.g. kinds=['linear', 'embedding', 'layernorm']), or kinds='all'.")
    return names


def identity_basis(device=None) -> torch.Tensor:
    """The marker of an identity eigenbasis: an empty float64 tensor."""
    return torch.empty(0, dtype=F64, device=device)


def find_factored_layers(target, modules: list[str] | None, kinds) -> list[Layer]:
    """The Target's layers of the resolved ``kinds`` (see :func:`resolve_kinds`); an error for
    an embedding or norm left out by the default kinds names ``kinds='all'``."""
    resolved = resolve_kinds(kinds)
    try:
        return find_layers(target, modules, resolved)
    except UnsupportedModuleError as exc:
        if set(ALL_KINDS) <= set(resolved):
            raise
        raise UnsupportedModuleError(
            f"{exc} K-FAC / EK-FAC factor nn.Embedding, nn.LayerNorm and nn.RMSNorm too when "
            "asked: kinds='all' (or e.g. kinds=['linear', 'conv1d', 'layernorm']).") from exc


def factored_shape(layer: Layer) -> tuple[int, int]:
    """``(rows, cols)`` of the layer's matrix: ``(d_out, width)``, or ``(m, 1)`` for a norm."""
    if layer.kind in NORM_KINDS:
        return norm_size(layer), 1
    return layer.d_out, layer.width


def decomposition_cost(layer: Layer) -> float:
    """Rough cost of the layer's eigendecompositions (cubic in each dense factor's side)."""
    rows, cols = factored_shape(layer)
    return float(rows) ** 3 + (0.0 if layer.kind == "embedding" else float(cols) ** 3)


def factored_index(layer: Layer, space: ParamSpace) -> torch.Tensor:
    """``[rows, cols]`` positions of the layer's matrix in the flat parameter vector."""
    if layer.kind not in NORM_KINDS:
        return layer_index(layer, space)
    slices = space.slices()
    parts = [torch.arange(slices[n].start, slices[n].stop) for n in (layer.weight, layer.bias)
             if n]
    return torch.cat(parts)[:, None]


def factored_matrix(layer: Layer, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[k, rows, cols]``: the layer's entries of ``{parameter: [k, *shape]}``."""
    if layer.kind not in NORM_KINDS:
        return layer_matrix(layer, tensors)
    parts = [tensors[n].reshape(tensors[n].shape[0], -1) for n in (layer.weight, layer.bias)
             if n]
    return torch.cat(parts, dim=1)[:, :, None]


def factored_parameters(layer: Layer, matrix: torch.Tensor,
                        shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`factored_matrix`: ``{parameter: [k, *shape]}``."""
    if layer.kind not in NORM_KINDS:
        return layer_parameters(layer, matrix, shapes)
    k, column, out, start = matrix.shape[0], matrix[:, :, 0], {}, 0
    for name in (layer.weight, layer.bias):
        if name:
            size = int(torch.Size(shapes[name]).numel())
            out[name] = column[:, start:start + size].reshape(k, *shapes[name]).contiguous()
            start += size
    return out


def eigh_or_diagonal(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues, eigenvectors)`` of a symmetric factor; a diagonal factor given as a
    vector keeps its entries (in place order) with the identity marker as basis."""
    if factor.dim() == 1:
        return factor.clone(), identity_basis(factor.device)
    return torch.linalg.eigh(factor)


def rotate_in(block: torch.Tensor, qs: torch.Tensor, qa: torch.Tensor) -> torch.Tensor:
    """``Q_Sᵀ X Q_A`` of ``X [k, rows, cols]`` (identity markers skipped)."""
    out = block if not qs.numel() else qs.T @ block
    return out if not qa.numel() else out @ qa


def rotate_out(rotated: torch.Tensor, qs: torch.Tensor, qa: torch.Tensor) -> torch.Tensor:
    """``Q_S Y Q_Aᵀ`` of ``Y [k, rows, cols]`` (identity markers skipped)."""
    out = rotated if not qs.numel() else qs @ rotated
    return out if not qa.numel() else out @ qa.T


def dense_basis(qs: torch.Tensor, qa: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``Q_S ⊗ Q_A`` ``[rows·cols, rows·cols]`` (row-major vec), identities formed: tests only."""
    rows, cols = shape
    eye = torch.eye(max(rows, cols), dtype=F64, device=qs.device)
    left = qs if qs.numel() else eye[:rows, :rows]
    right = qa if qa.numel() else eye[:cols, :cols]
    return torch.kron(left, right)
