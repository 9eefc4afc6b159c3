"""Classification with cross-entropy on logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Task

MEASUREMENTS = ("loss", "margin", "log_odds", "logit", "probability", "predicted_probability")


class ClassificationTask(Task):
    """Cross-entropy on logits ``[B, K]`` with integer labels ``[B]``.

    ``measurement`` picks f for queries:

    - ``"loss"``: cross-entropy of the given label (``score > 0``: the training example helped
      lower it);
    - ``"margin"``: logit of the given label minus the largest other logit;
    - ``"log_odds"``: log(p_y / (1 − p_y)) = logit of the label minus the logsumexp of the
      others (TRAK's model output function; smooth where ``"margin"`` has kinks);
    - ``"logit"``: the logit of the given label;
    - ``"probability"``: softmax probability of the given label;
    - ``"predicted_probability"``: softmax probability of the class the model predicts.
    """

    def __init__(self, measurement: str = "loss"):
        if measurement not in MEASUREMENTS:
            raise ValueError(f"measurement={measurement!r} is not one of {MEASUREMENTS}")
        self.measurement_name = measurement

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none")

    def measurement(self, outputs, targets):
        kind = self.measurement_name
        if kind == "loss":
            return self.loss(outputs, targets)
        label_logit = outputs.gather(1, targets[:, None])[:, 0]
        if kind == "logit":
            return label_logit
        if kind == "margin":
            others = outputs.scatter(1, targets[:, None], float("-inf"))
            return label_logit - others.max(dim=1).values
        if kind == "log_odds":
            return log_odds(outputs, targets)
        probs = outputs.softmax(dim=1)
        if kind == "probability":
            return probs.gather(1, targets[:, None])[:, 0]
        return probs.max(dim=1).values

    def predictive_targets(self, outputs):
        # Every class, weighted by its predicted probability: the exact expectation.
        n_classes = outputs.shape[-1]
        probs = outputs.detach().softmax(dim=-1)
        labels = [torch.full(outputs.shape[:1], c, dtype=torch.long, device=outputs.device)
                  for c in range(n_classes)]
        return labels, probs.T

    def describe_measurement(self) -> str:
        return self.measurement_name.replace("_", " ")


def log_odds(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]`` log(p_y / (1 − p_y)) of the labelled class: its logit minus the logsumexp of the
    other logits (``logits [B, K]``, integer ``labels [B]``)."""
    label_logit = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return label_logit - others.logsumexp(dim=1)
