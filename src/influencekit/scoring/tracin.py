"""TracInCP (Pruthi et al. 2020): gradient similarity summed over training checkpoints.

score[q, m] = Σ_c η_c · g_q(θ_c)ᵀ g_m(θ_c), ``[n_query, n_train]``, with g_m the training
gradient of the conventions table (∇ℓ + ∇R) and g_q the measurement gradient, both at checkpoint
c, and η_c its learning rate. Positive = helpful: a gradient step of size η_c on z_m lowers the
query's measurement by about η_c·g_qᵀg_m. No curvature and no 1/n (TracIn's own scale).
"""

from __future__ import annotations

import torch

from ..errors import ModelMismatchError
from ..grads import gradients
from ..runtime import Runtime, resolve_runtime


class TracIn:
    """TracInCP over ``checkpoints`` (flat ``[p]`` tensors or state dicts of the Target's
    parameters) with ``learning_rates`` (one float for all, or one per checkpoint)."""

    def __init__(self, target, checkpoints, learning_rates=1.0):
        self.target = target
        self.checkpoints = list(checkpoints)
        if not self.checkpoints:
            raise ValueError("TracIn needs at least one checkpoint")
        if isinstance(learning_rates, (int, float)):
            learning_rates = [float(learning_rates)] * len(self.checkpoints)
        if len(learning_rates) != len(self.checkpoints):
            raise ValueError(f"{len(learning_rates)} learning rates for "
                             f"{len(self.checkpoints)} checkpoints")
        self.learning_rates = [float(x) for x in learning_rates]

    def _dtype(self, runtime):
        return runtime.dtype or next(iter(self.target.params().values())).dtype

    def _params(self, checkpoint, dtype, device):
        space = self.target.space
        if isinstance(checkpoint, dict):
            missing = [n for n in space.names if n not in checkpoint]
            if missing:
                raise ModelMismatchError(f"a TracIn checkpoint lacks the Target's parameters "
                                         f"{missing[:4]}: it belongs to another model; pass "
                                         "state dicts (or flat vectors) of this Target's model.")
            wrong = [n for n, shape in zip(space.names, space.shapes, strict=True)
                     if tuple(torch.as_tensor(checkpoint[n]).shape) != tuple(shape)]
            if wrong:
                raise ModelMismatchError(f"TracIn checkpoint parameters {wrong[:4]} have other "
                                         "shapes than the Target's: the checkpoint belongs to "
                                         "another model.")
            return {n: torch.as_tensor(checkpoint[n]).to(dtype=dtype, device=device)
                    for n in space.names}
        flat = torch.as_tensor(checkpoint).to(dtype=dtype, device=device)
        if flat.shape != (space.numel,):
            raise ModelMismatchError(f"a flat TracIn checkpoint must have shape [p] = "
                                     f"[{space.numel}] (this Target's parameters), got "
                                     f"{list(flat.shape)}: it belongs to another model.")
        return space.unflatten(flat)

    def pairwise(self, query, train, runtime: Runtime | None = None) -> torch.Tensor:
        """Scores ``[n_query, n_train]`` (module doc for sign and scale)."""
        return self._accumulate(lambda gq, gm: gq @ gm.T, query, train, runtime)

    def self_influence(self, train, runtime: Runtime | None = None) -> torch.Tensor:
        """Σ_c η_c ‖g_m(θ_c)‖², ``[n_train]``."""
        runtime = resolve_runtime(runtime)
        total = 0.0
        for eta, ckpt in zip(self.learning_rates, self.checkpoints, strict=True):
            params = self._params(ckpt, self._dtype(runtime), runtime.device)
            g = gradients(self.target, train, runtime, of="loss", params=params)
            total = total + eta * (g * g).sum(dim=1)
        return total

    def _accumulate(self, combine, query, train, runtime):
        runtime = resolve_runtime(runtime)
        total = 0.0
        for eta, ckpt in zip(self.learning_rates, self.checkpoints, strict=True):
            params = self._params(ckpt, self._dtype(runtime), runtime.device)
            gq = gradients(self.target, query, runtime, of="measurement", params=params)
            gm = gradients(self.target, train, runtime, of="loss", params=params)
            total = total + eta * combine(gq, gm)
        return total
