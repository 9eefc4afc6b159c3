"""Which labels a Fisher-type curvature is computed with.

The Fisher of the MEAN training loss is ``(1/Σw) Σ_i w_i E_{y ~ p_θ(·|x_i)}[g_i(y) g_i(y)ᵀ]``.
The expectation over labels y is taken in one of three ways (``mode``):

- ``"exact"``: every target of ``task.predictive_targets`` weighted by its probability (all
  classes for classification, sigma points for squared error, every (position, token) pair of
  a causal language model with a small vocabulary) — the exact Fisher;
- ``"sampled"``: ``n_samples`` draws per example from ``task.sample_targets`` with a seeded
  generator, each weighted 1/n_samples — an unbiased estimate, the practical way for a language
  model with a real vocabulary (``"auto"`` picks it there);
- ``"empirical"``: the data's own labels (the empirical Fisher).
"""

from __future__ import annotations

import torch

from ..errors import InfluenceKitError

LABEL_MODES = ("exact", "sampled", "empirical")
F64 = torch.float64


def resolve_label_mode(task, kind: str, labels: str = "auto") -> str:
    """The label mode for a curvature ``kind`` and a requested ``labels`` (``"auto"``: exact
    when the task enumerates its predictive distribution, else sampled)."""
    if labels not in LABEL_MODES + ("auto",):
        raise InfluenceKitError(f"labels={labels!r} is not one of {LABEL_MODES + ('auto',)}")
    if kind == "empirical_fisher":  # the data's labels, whatever was asked for the Fisher
        return "empirical"
    if labels == "empirical":
        raise InfluenceKitError(
            f"labels='empirical' approximates the empirical Fisher, but the curvature has "
            f"kind={kind!r}. Fit on ik.Curvature(..., kind='empirical_fisher'), or use "
            "labels='exact' or 'sampled'.")
    if labels in ("auto", "sampled") and not task.samples_targets:
        raise InfluenceKitError(
            f"the model's own labels are needed (kind={kind!r}), but {type(task).__name__} "
            "defines neither predictive_targets() (the exact expectation) nor sample_targets() "
            "(draws from the model). Implement one of them, or use "
            "ik.Curvature(..., kind='empirical_fisher') (the data's labels).")
    if labels == "auto":
        return ("exact" if task.enumerates_targets and task.exact_labels_by_default
                else "sampled")
    if labels == "exact" and not task.enumerates_targets:
        raise InfluenceKitError(
            f"labels='exact' needs the task's predictive distribution enumerated, but "
            f"{type(task).__name__} does not define predictive_targets() (a language model "
            "would need V^T label sequences). Use labels='sampled' (seeded draws from the "
            "model), or kind='empirical_fisher'.")
    return labels


class LabelSets:
    """Label sets ``[(targets, weights [B])]`` for one batch of outputs, per label mode.

    A fresh instance per pass over the data: its generator is seeded at construction, so every
    pass draws the same samples (a deterministic operator, and K-FAC's factor and correction
    passes use the same labels). Passes that may be split (over processes, or into resumable
    chunks) take ``labels.at(start)`` for the batch starting at example ``start``: its draws
    depend only on the seed and that position, not on which process computes the batch.
    """

    def __init__(self, mode: str, n_samples: int = 1, seed: int = 0):
        if mode not in LABEL_MODES:
            raise InfluenceKitError(f"label mode {mode!r} is not one of {LABEL_MODES}")
        if n_samples < 1:
            raise InfluenceKitError(f"n_samples must be >= 1, got {n_samples}")
        self.mode = mode
        self.n_samples = n_samples
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def at(self, start: int) -> LabelSets:
        """The label sets of the batch whose first example is ``start``: the same mode, with a
        generator seeded from ``(seed, start)`` (only ``"sampled"`` draws depend on it)."""
        if self.mode != "sampled":
            return self
        mixed = (self.seed * 0x9E3779B97F4A7C15 + int(start) * 0xBF58476D1CE4E5B9) % 2**63
        return LabelSets(self.mode, self.n_samples, mixed)

    def __call__(self, task, outputs: torch.Tensor, true_targets) -> list:
        size = outputs.shape[0]
        device = outputs.device
        if self.mode == "empirical":
            return [(true_targets, torch.ones(size, dtype=F64, device=device))]
        if self.mode == "exact":
            try:
                targets, probs = (
                    task.predictive_targets(outputs.detach(), true_targets)
                    if task.predictive_targets_take_targets
                    else task.predictive_targets(outputs.detach()))
            except NotImplementedError as exc:
                raise InfluenceKitError(
                    f"labels='exact' needs the labels' predictive distribution, but "
                    f"{type(task).__name__}.predictive_targets() is not implemented. Implement "
                    "it, or fit on ik.Curvature(..., kind='empirical_fisher') (true labels)."
                ) from exc
            probs = probs.to(F64)
            return [(t, probs[s]) for s, t in enumerate(targets)]
        weight = torch.full((size,), 1.0 / self.n_samples, dtype=F64, device=device)
        return [(task.sample_targets(outputs.detach(), true_targets, self.generator), weight)
                for _ in range(self.n_samples)]
