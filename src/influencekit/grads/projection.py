"""Random projections of gradients: flat ``[B, p] -> [B, k]`` sketches (TRAK-style,
:class:`RandomProjection`) and per-layer factored ones (LoGra-style, :class:`LayerProjection`).

The projection matrix ``P [p, k]`` has i.i.d. entries (Gaussian N(0, 1) or Rademacher ±1)
scaled by 1/√k, so E[PPᵀ] = I and inner products are preserved in expectation. It is generated
from ``seed`` in row blocks, so the same seed gives the same matrix on any machine.
"""

from __future__ import annotations

import hashlib
import math

import torch

KINDS = ("gaussian", "rademacher")


class RandomProjection:
    """Projects ``[..., p]`` to ``[..., dim]``; the matrix is built on first use (``matrix_``)."""

    def __init__(self, dim: int, kind: str = "gaussian", seed: int = 0):
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {KINDS}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.kind = kind
        self.seed = seed

    def matrix(self, p: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """``P [p, dim]``."""
        cached = getattr(self, "matrix_", None)
        if cached is None or cached.shape[0] != p:
            gen = torch.Generator().manual_seed(int(self.seed))
            if self.kind == "gaussian":
                m = torch.randn(p, self.dim, generator=gen, dtype=torch.float64)
            else:
                m = torch.randint(0, 2, (p, self.dim), generator=gen).to(torch.float64) * 2 - 1
            self.matrix_ = m / math.sqrt(self.dim)
        return self.matrix_.to(dtype=dtype, device=device)

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        return grads @ self.matrix(grads.shape[-1], grads.dtype, grads.device)


# -- factored (per-layer) projections ---------------------------------------------------------
LAYER_KINDS = ("gaussian", "rademacher", "identity")


class LayerProjection:
    """LoGra-style projections of each layer's gradient, one matrix per side, never ``[p, k]``.

    A Kronecker layer's per-example gradient ``G = Σ_t δ_t a_tᵀ`` (``[d_out, width]``, see
    :mod:`influencekit.grads.layers`) is projected to ``G̃ = P_outᵀ G P_in = Σ_t (P_outᵀ δ_t)
    (P_inᵀ a_t)ᵀ`` of shape ``[k_out, k_in]``: the output gradients and the activations are each
    projected BEFORE their outer product, so the cost is ``T·(d_out·k_out + width·k_in)`` per
    example and the matrices hold ``d_out·k_out + width·k_in`` numbers. This is the Kronecker
    product ``P = P_out ⊗ P_in`` applied to the row-major gradient, ``G̃ = vec⁻¹(Pᵀ vec G)``.
    An embedding's one-hot inputs pick rows of ``P_in`` (nothing of vocabulary size is formed
    per token). LayerNorm / RMSNorm gradients (``d`` numbers per parameter) are kept unprojected.

    Args:
        dim: ``k`` for both sides, ``(k_out, k_in)``, or ``{layer name: (k_out, k_in)}`` (layers
            not named: ``dim[None]`` if given, else no projection). Any size ≥ 1; larger than the
            layer's side is allowed (then ``P Pᵀ → I`` as k grows).
        kind: ``"gaussian"`` (N(0, 1/k) entries), ``"rademacher"`` (±1/√k) or ``"identity"``
            (``P = I``: no projection, ``dim`` ignored). With the random kinds ``E[P Pᵀ] = I``, so
            inner products of projected gradients are unbiased.
        seed: the matrices of layer ``L`` are drawn from a generator seeded with
            ``(seed, L's name)`` (sha256), in float64 on the CPU: the same on any machine and
            independent of which other layers are projected.
    """

    def __init__(self, dim=64, kind: str = "gaussian", seed: int = 0):
        self.dim = dim
        self.kind = kind
        self.seed = seed
        self._cache: dict = {}

    def get_config(self) -> dict:
        """JSON-serialisable settings (recorded by gradient stores)."""
        dim = self.dim
        if isinstance(dim, dict):
            dim = {("*" if k is None else k): list(v) if isinstance(v, (tuple, list)) else v
                   for k, v in sorted(dim.items(), key=lambda kv: str(kv[0]))}
        elif isinstance(dim, (tuple, list)):
            dim = list(dim)
        return {"dim": dim, "kind": self.kind, "seed": int(self.seed)}

    def check(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {LAYER_KINDS}")

    def dims(self, layer) -> tuple[int, int]:
        """``(k_out, k_in)`` of a Kronecker layer (its own sizes for ``"identity"``)."""
        self.check()
        if self.kind == "identity":
            return layer.d_out, layer.width
        dim = self.dim
        if isinstance(dim, dict):
            dim = dim.get(layer.name, dim.get(None, dim.get("*")))
            if dim is None:
                return layer.d_out, layer.width
        if isinstance(dim, int):
            dim = (dim, dim)
        k_out, k_in = (int(d) for d in dim)
        if k_out < 1 or k_in < 1:
            raise ValueError(f"projection dimensions must be >= 1, got {dim} for {layer.name!r}")
        return k_out, k_in

    def matrices(self, layer, dtype=torch.float64, device="cpu"
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(P_out [d_out, k_out], P_in [width, k_in])`` of a Kronecker layer; ``None`` for an
        identity side (no projection)."""
        key = (layer.name, layer.d_out, layer.width, dtype, str(device))
        if key not in self._cache:
            k_out, k_in = self.dims(layer)
            base = self._base(layer, k_out, k_in)
            self._cache[key] = tuple(None if m is None else m.to(dtype=dtype, device=device)
                                     for m in base)
        return self._cache[key]

    def _base(self, layer, k_out: int, k_in: int):
        if self.kind == "identity" or (isinstance(self.dim, dict)
                                       and layer.name not in self.dim
                                       and None not in self.dim and "*" not in self.dim):
            return None, None
        gen = torch.Generator().manual_seed(_layer_seed(self.seed, layer.name))
        return (self._draw(layer.d_out, k_out, gen), self._draw(layer.width, k_in, gen))

    def _draw(self, rows: int, cols: int, gen) -> torch.Tensor:
        if self.kind == "gaussian":
            m = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
        else:
            m = torch.randint(0, 2, (rows, cols), generator=gen).to(torch.float64) * 2 - 1
        return m / math.sqrt(cols)

    def project_tokens(self, layer, a: torch.Tensor | None, delta: torch.Tensor,
                       ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_inᵀ a_t [B, T, k_in], P_outᵀ δ_t [B, T, k_out])`` of a Kronecker layer. For an
        embedding pass the token ``ids [B, T]`` instead of ``a`` (rows of ``P_in`` are picked)."""
        p_out, p_in = self.matrices(layer, delta.dtype, delta.device)
        d = delta if p_out is None else delta @ p_out
        if ids is not None:
            if p_in is None:
                a = torch.nn.functional.one_hot(ids, layer.width).to(delta.dtype)
            else:
                a = p_in[ids]
        elif p_in is not None:
            a = a @ p_in
        return a, d

    def project_matrix(self, layer, g: torch.Tensor) -> torch.Tensor:
        """``[k, d_out, width]`` gradient matrices -> ``[k, k_out, k_in]`` (``P_outᵀ G P_in``)."""
        p_out, p_in = self.matrices(layer, g.dtype, g.device)
        if p_out is not None:
            g = p_out.T @ g
        if p_in is not None:
            g = g @ p_in
        return g


def _layer_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
