"""Classification with cross-entropy on logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LabelError, TaskOutputShapeError
from .base import Task

#: Cross-entropy's ignore index: refused by the classification tasks (see ``check_targets``).
IGNORE_INDEX = -100

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

    def check_targets(self, targets, outputs, start):
        """Labels must be integer class indices ``[B]`` in ``[0, K)`` for logits ``[B, K]``.

        The ignore index ``-100`` is refused: cross-entropy would give that example a zero loss,
        a zero gradient and a score of exactly 0 that means nothing. Leave unlabelled examples
        out of the data instead.
        """
        check_class_labels(type(self).__name__, targets, outputs, start)

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


def check_class_labels(name: str, labels, outputs: torch.Tensor, start: int) -> None:
    """The checks of :meth:`ClassificationTask.check_targets` (``name`` is the task's class)."""
    if outputs.dim() != 2:
        raise TaskOutputShapeError(
            f"{name} reads logits [B, K] from the model, but it returns shape "
            f"{list(outputs.shape)} for one example; override Task.forward to return [B, K].")
    if outputs.shape[-1] < 2:
        raise TaskOutputShapeError(
            f"{name} reads logits [B, K] of K >= 2 classes, but the model returns one logit per "
            f"example (shape {list(outputs.shape)} for one example): cross-entropy over one "
            "class is always 0. Output two logits (nn.Linear(d, 2)) for a binary problem.")
    if not isinstance(labels, torch.Tensor):
        raise LabelError(f"{name} needs the labels as a tensor of class indices [B], got "
                         f"{type(labels).__name__} (batch starting at example {start}).",
                         index=start)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise LabelError(
            f"the labels of the batch starting at example {start} are "
            f"{str(labels.dtype).replace('torch.', '')}; {name} needs integer class indices "
            "[B] (y.long()). One-hot or soft labels: y.argmax(dim=1); a real-valued target: "
            "ik.RegressionTask.", index=start)
    if labels.dim() != 1:
        hint = ("one-hot? pass y.argmax(dim=1)" if labels.dim() == 2 and labels.shape[1] > 1
                else "pass y.reshape(-1)")
        raise LabelError(
            f"the labels of the batch starting at example {start} have shape "
            f"{list(labels.shape)}; {name} needs class indices of shape [B] ({hint}).",
            index=start)
    ignored = labels == IGNORE_INDEX
    if ignored.any():
        i = int(ignored.nonzero()[0, 0])
        raise LabelError(
            f"the label of example {start + i} is -100, cross-entropy's ignore index: that "
            "example would get a zero loss, a zero gradient and a score of 0 that means "
            f"nothing, so {name} refuses it. Leave unlabelled examples out "
            "(torch.utils.data.Subset of the labelled ones) or give them their class.",
            index=start + i)
    n_classes = outputs.shape[-1]
    bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise LabelError(
            f"the label of example {start + i} is {int(labels[i])}, outside the model's "
            f"{n_classes} classes (0 to {n_classes - 1}). Check the labels (numbered from 1? "
            "use y - 1) or the size of the model's output layer.", index=start + i)
