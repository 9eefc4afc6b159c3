"""Regression with squared error."""

from __future__ import annotations

import math

import torch

from ..errors import LabelError
from .base import Task


class RegressionTask(Task):
    """Squared error ``ℓ = Σ_j (ŷ_j − y_j)²`` per example (summed over output dimensions, no ½).

    ``measurement="loss"`` (default) or ``"prediction"``: the model output itself (summed over
    output dimensions when there are several; select one with ``output_index``).
    """

    def __init__(self, measurement: str = "loss", output_index: int | None = None):
        if measurement not in ("loss", "prediction"):
            raise ValueError(f"measurement={measurement!r} is not 'loss' or 'prediction'")
        self.measurement_name = measurement
        self.output_index = output_index

    @staticmethod
    def _per_example(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(values.shape[0], -1).sum(dim=1)

    def loss(self, outputs, targets):
        return self._per_example((outputs - targets.reshape(outputs.shape)) ** 2)

    def check_targets(self, targets, outputs, start):
        """Targets must hold one value per model output (``[B, *out]``, or ``[B]`` for one
        output), as numbers."""
        if not isinstance(targets, torch.Tensor) or targets.is_complex() or not targets.dim():
            raise LabelError(
                f"RegressionTask needs the targets as a real tensor [B, ...] (batch starting at "
                f"example {start}), got {_describe(targets)}.", index=start)
        per_example = outputs[0].numel()
        got = targets[0].numel()
        if got != per_example:
            raise LabelError(
                f"the targets of example {start} hold {got} value(s) (shape "
                f"{list(targets.shape[1:])}), the model predicts {per_example} (shape "
                f"{list(outputs.shape[1:])}); RegressionTask compares them one by one. Give "
                "the targets the shape of the model's output per example (y[:, None] for one "
                "output).", index=start)

    def measurement(self, outputs, targets):
        if self.measurement_name == "loss":
            return self.loss(outputs, targets)
        flat = outputs.reshape(outputs.shape[0], -1)
        if self.output_index is not None:
            return flat[:, self.output_index]
        return flat.sum(dim=1)

    def predictive_targets(self, outputs):
        # The loss is the negative log-likelihood of N(ŷ, ½ I) up to a constant. Its gradient is
        # linear in y, so 2d symmetric sigma points y = ŷ ± √(d/2)·e_j reproduce E[g gᵀ] exactly.
        flat = outputs.detach().reshape(outputs.shape[0], -1)
        d = flat.shape[1]
        step = math.sqrt(d / 2.0)
        targets = []
        for j in range(d):
            for sign in (1.0, -1.0):
                shifted = flat.clone()
                shifted[:, j] += sign * step
                targets.append(shifted.reshape(outputs.shape))
        probs = torch.full((2 * d, flat.shape[0]), 1.0 / (2 * d), dtype=flat.dtype,
                           device=flat.device)
        return targets, probs

    def describe_measurement(self) -> str:
        return "squared error" if self.measurement_name == "loss" else "prediction"


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
