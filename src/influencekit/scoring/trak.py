"""TRAK (Park et al. 2023): projected-gradient kernel scores, optionally over an ensemble.

For each model (flat parameters θ_j): Φ = [P ∇f_out(z_m)] ``[n_train, k]`` and φ_q = P ∇f_out(z_q)
with P a random projection (``projection=None``: no projection, k = p). The per-model score is
φ_qᵀ (ΦᵀΦ/n + λI)⁻¹ φ_m; the ensemble score averages it over models and multiplies column m by
the average out-to-loss weight Q_m:

    score[q, m] = mean_j[φ_qᵀ(Φ_jᵀΦ_j/n + λI)⁻¹φ_m] · mean_j[Q_m]        ``[n_query, n_train]``

Model output function and Q (``output``):
- ``"margin"`` (classification): f_out = log(p_y / (1 − p_y)) of the labelled class,
  Q = 1 − p_y (TRAK's reweighting: d loss / d f_out = −(1 − p_y));
- ``"loss"`` (any task): f_out = the training loss, Q = 1.
The query uses the same f_out, so positive = helpful (raising the query's margin / lowering its
loss). Scale: the kernel is a MEAN over n like our curvature, so scores are on the s scale of
the conventions table (removal effect ≈ +s/n).
"""

from __future__ import annotations

import torch

from ..func.grads import per_example_gradients
from ..grads.data import as_loader, batches
from ..grads.projection import RandomProjection
from ..runtime import Runtime, resolve_runtime


class TRAK:
    """TRAK scores of a Target.

    Args:
        target: model + task (``output="margin"`` needs logits and integer labels).
        models: flat parameter vectors ``[p]`` of the ensemble (default: the Target's own).
        projection: a :class:`~influencekit.grads.projection.RandomProjection` or None.
        damping: λ added to the mean kernel ΦᵀΦ/n.
        output: ``"margin"`` or ``"loss"``.
    """

    def __init__(self, target, models=None, projection: RandomProjection | None = None,
                 damping: float = 0.0, output: str = "margin"):
        if output not in ("margin", "loss"):
            raise ValueError(f"output={output!r} is not 'margin' or 'loss'")
        self.target = target
        self.models = models
        self.projection = projection
        self.damping = damping
        self.output = output

    def _fn(self):
        target = self.target
        if self.output == "loss":
            return target.losses

        def margin(params, batch):
            logits = target.outputs(params, batch)
            y = target.task.targets(batch).to(logits.device)
            label = logits.gather(1, y[:, None])[:, 0]
            others = logits.scatter(1, y[:, None], float("-inf")).logsumexp(dim=1)
            return label - others
        return margin

    def _features(self, params, data, runtime, dtype):
        """(Φ [n, k], Q [n])."""
        fn = self._fn()
        feats, qs = [], []
        for _, batch, _ in batches(as_loader(data, runtime), runtime, dtype):
            values, grads = per_example_gradients(fn, params, batch)
            flat = self.target.space.flatten(grads, batch_dims=1)
            feats.append(flat if self.projection is None else self.projection(flat))
            if self.output == "margin":
                qs.append(1.0 - torch.sigmoid(values.detach()))  # σ(log-odds) = p_y
            else:
                qs.append(torch.ones_like(values.detach()))
        return torch.cat(feats), torch.cat(qs)

    def pairwise(self, query, train, runtime: Runtime | None = None) -> torch.Tensor:
        """Scores ``[n_query, n_train]`` (module doc for sign and scale)."""
        runtime = resolve_runtime(runtime)
        dtype = runtime.dtype or torch.float64
        models = self.models or [self.target.flat_params(dtype, runtime.device)]
        total, q_total = 0.0, 0.0
        for flat in models:
            params = self.target.space.unflatten(torch.as_tensor(flat).to(dtype))
            phi, q = self._features(params, train, runtime, dtype)
            phi_q, _ = self._features(params, query, runtime, dtype)
            phi, phi_q = phi.to(torch.float64), phi_q.to(torch.float64)
            n = phi.shape[0]
            kernel = phi.T @ phi / n + self.damping * torch.eye(phi.shape[1], dtype=phi.dtype)
            total = total + phi_q @ torch.linalg.solve(kernel, phi.T)
            q_total = q_total + q.to(torch.float64)
        m = len(models)
        return (total / m) * (q_total / m)[None, :]
