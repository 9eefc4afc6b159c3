"""TRAK (Park et al. 2023): projected-gradient kernel scores, optionally over an ensemble.

For each model (flat parameters θ_j): Φ = [P ∇f_out(z_m)] ``[n_train, k]`` and φ_q = P ∇f_out(z_q)
with P a random projection (``projection=None``: no projection, k = p). The per-model score is
φ_qᵀ (ΦᵀΦ/n + λI)⁻¹ φ_m; the ensemble score averages it over models and multiplies column m by
the average out-to-loss weight Q_m:

    score[q, m] = mean_j[φ_qᵀ(Φ_jᵀΦ_j/n + λI)⁻¹φ_m] · mean_j[Q_m]        ``[n_query, n_train]``

Model output function and Q (``measurement``):
- ``"log_odds"`` (classification): f_out = log(p_y / (1 − p_y)) of the labelled class,
  Q = 1 − p_y (TRAK's reweighting: d loss / d f_out = −(1 − p_y));
- ``"loss"`` (any task): f_out = the training loss, Q = 1.
The query uses the same f_out, so positive = helpful (raising the query's margin / lowering its
loss). Scale: the kernel is a MEAN over n like our curvature, so scores are on the s scale of
the conventions table (removal effect ≈ +s/n).
"""

from __future__ import annotations

import torch

from ..errors import InfluenceKitError, ModelMismatchError
from ..grads import RandomProjection, iter_values_and_gradients, sharded
from ..runtime import Runtime, resolve_runtime
from ..task.classification import log_odds

MEASUREMENTS = ("log_odds", "loss")


class TRAK:
    """TRAK scores of a Target.

    Args:
        target: model + task (``measurement="log_odds"`` needs logits ``[B, K]`` and integer
            labels).
        models: flat parameter vectors ``[p]`` of the ensemble (default: the Target's own).
        projection: a :class:`~influencekit.grads.RandomProjection` or None.
        damping: λ added to the mean kernel ΦᵀΦ/n.
        measurement: ``"log_odds"`` or ``"loss"`` (module docstring).
    """

    def __init__(self, target, models=None, projection: RandomProjection | None = None,
                 damping: float = 0.0, measurement: str = "log_odds"):
        if measurement not in MEASUREMENTS:
            raise InfluenceKitError(f"measurement={measurement!r} is not one of {MEASUREMENTS}")
        self.target = target
        self.models = models
        self.projection = projection
        self.damping = damping
        self.measurement = measurement

    def _features(self, params, data, runtime):
        """(Φ [n, k], Q [n]) through the gradient engine (no regulariser: f_out's gradient);
        split over the processes of ``runtime.context`` and gathered."""
        of = log_odds if self.measurement == "log_odds" else "loss"

        def compute(part, local):
            feats, qs = [], []
            for _, values, flat in iter_values_and_gradients(
                    self.target, part, local, of=of, params=params, desc="TRAK features",
                    include_regularizer=False):
                feats.append(flat if self.projection is None else self.projection(flat))
                if self.measurement == "log_odds":
                    qs.append(1.0 - torch.sigmoid(values))  # σ(log-odds) = p_y
                else:
                    qs.append(torch.ones_like(values))
            return torch.cat(feats), torch.cat(qs)

        def empty():
            some = next(iter(params.values()))
            k = self.target.num_params if self.projection is None else self.projection.dim
            return (some.new_empty(0, k), some.new_empty(0))

        return sharded(data, runtime, compute, empty)

    def pairwise(self, query, train, runtime: Runtime | None = None) -> torch.Tensor:
        """Scores ``[n_query, n_train]`` (module doc for sign and scale)."""
        runtime = resolve_runtime(runtime)
        dtype = runtime.dtype or torch.float64
        runtime = runtime.replace(dtype=dtype)
        models = self.models or [self.target.flat_params(dtype, runtime.device)]
        total, q_total = 0.0, 0.0
        for flat in models:
            flat = torch.as_tensor(flat).to(dtype=dtype, device=runtime.device)
            if flat.shape != (self.target.num_params,):
                raise ModelMismatchError(
                    f"a TRAK model must be a flat parameter vector [p] = "
                    f"[{self.target.num_params}] of this Target's parameters, got "
                    f"{list(flat.shape)}: it belongs to another model.")
            params = self.target.space.unflatten(flat)
            phi, q = self._features(params, train, runtime)
            phi_q, _ = self._features(params, query, runtime)
            phi, phi_q = phi.to(torch.float64), phi_q.to(torch.float64)
            n = phi.shape[0]
            kernel = phi.T @ phi / n + self.damping * torch.eye(phi.shape[1], dtype=phi.dtype,
                                                                device=phi.device)
            total = total + phi_q @ torch.linalg.solve(kernel, phi.T)
            q_total = q_total + q.to(torch.float64)
        m = len(models)
        return (total / m) * (q_total / m)[None, :]

