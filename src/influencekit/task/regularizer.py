"""Regularisers R(θ) that sit beside the weighted-mean data loss."""

from __future__ import annotations

import torch


class L2Regularizer:
    """R(θ) = (strength / 2) · Σ ‖θ_k‖² over the named parameters (all when ``names`` is None).

    Called with the dict of the Target's parameters; returns a scalar.
    """

    def __init__(self, strength: float, names: list[str] | None = None):
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        self.strength = float(strength)
        self.names = names

    def __call__(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen = params if self.names is None else {k: params[k] for k in self.names}
        total = sum((t**2).sum() for t in chosen.values())
        return 0.5 * self.strength * total

    def __repr__(self) -> str:
        return f"L2Regularizer(strength={self.strength}, names={self.names})"
