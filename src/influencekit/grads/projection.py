"""Random projections of per-example gradients ``[B, p] -> [B, k]`` (TRAK-style sketches).

The projection matrix ``P [p, k]`` has i.i.d. entries (Gaussian N(0, 1) or Rademacher ±1)
scaled by 1/√k, so E[PPᵀ] = I and inner products are preserved in expectation. It is generated
from ``seed`` in row blocks, so the same seed gives the same matrix on any machine.
"""

from __future__ import annotations

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
