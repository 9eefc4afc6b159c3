"""Task: what the model's outputs mean — a per-example loss and a per-example measurement.

A batch is a tuple ``(inputs, targets, ...)`` by default; override :meth:`Task.inputs` and
:meth:`Task.targets` for other layouts (for example a dict of token tensors).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Task(ABC):
    """Per-example loss ``[B]`` and measurement ``[B]`` computed from model outputs.

    Subclasses implement :meth:`loss`. The measurement f defaults to the loss; the influence
    ``score`` of a training example on f is ``g_qᵀ (C + λI)⁻¹ g_m`` with ``g_q = ∇θ f``.
    """

    def inputs(self, batch):
        """What the model is called on."""
        return batch[0]

    def targets(self, batch):
        """What the loss compares the outputs with."""
        return batch[1]

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets) -> torch.Tensor:
        """Per-example training loss, shape ``[B]`` (not reduced over the batch)."""

    def measurement(self, outputs: torch.Tensor, targets) -> torch.Tensor:
        """Per-example measurement f, shape ``[B]``; by default the loss."""
        return self.loss(outputs, targets)

    def predictive_targets(self, outputs: torch.Tensor):
        """Targets drawn from the model's own predictive distribution, for the true Fisher.

        Returns ``(targets, probabilities)``: ``targets`` is a sequence of S target batches and
        ``probabilities`` a ``[S, B]`` tensor of their weights (each column sums to one), chosen
        so that the weighted sum of gradient outer products is the exact Fisher. Tasks without
        such an enumeration raise ``NotImplementedError``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not define predictive_targets(); the true Fisher needs "
            "it. Use kind='ggn' or kind='empirical_fisher' instead."
        )

    def describe_measurement(self) -> str:
        """A short human name of the measurement, used in reports."""
        return "loss"
