"""Tasks for Hugging Face ``transformers`` models fed dict batches (no wrapper needed).

A batch is a dict of tensors whose first dimension is the example, as a tokenizer returns it:
``input_ids [B, T]``, ``attention_mask [B, T]`` (1 = real token, 0 = padding), optionally
``token_type_ids``, and the targets (``labels``). Every key except the targets is passed to
the model as a keyword argument; the model may return a ``ModelOutput`` (its ``.logits`` is
used). Nothing here imports ``transformers``: any model with that calling convention works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Task, output_tensor
from .classification import ClassificationTask

IGNORE_INDEX = -100


def _model_inputs(batch: dict, exclude: tuple[str, ...]) -> dict:
    if not isinstance(batch, dict):
        raise TypeError(f"this task reads dict batches (as a tokenizer returns them), got "
                        f"{type(batch).__name__}; build the data set from a dict of tensors, "
                        "e.g. ik.grads.DictDataset({'input_ids': ..., 'labels': ...}).")
    return {k: v for k, v in batch.items() if k not in exclude}


def _attention_mask(batch: dict) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return None if mask is None else mask.bool()


class SequenceClassificationTask(ClassificationTask):
    """Cross-entropy of a sequence classifier (``AutoModelForSequenceClassification``).

    Args:
        measurement: as :class:`~influencekit.ClassificationTask` (``"loss"``, ``"margin"``,
            ``"log_odds"``, ``"logit"``, ``"probability"``, ``"predicted_probability"``).
        label_key: the batch key of the integer labels ``[B]``.

    The model is called as ``model(**batch_without_labels)``; its logits are ``[B, K]``.
    ``token_mask`` is the batch's ``attention_mask``.
    """

    def __init__(self, measurement: str = "loss", label_key: str = "labels"):
        super().__init__(measurement)
        self.label_key = label_key

    def inputs(self, batch):
        return _model_inputs(batch, (self.label_key,))

    def targets(self, batch):
        return batch[self.label_key]

    def forward(self, call, batch):
        return output_tensor(call(**self.inputs(batch)))

    def token_mask(self, batch):
        return _attention_mask(batch)


class CausalLMTask(Task):
    """Next-token cross-entropy of a causal language model (``AutoModelForCausalLM``).

    Targets are ``batch["labels"] [B, T]`` when present (``-100`` marks tokens that are not
    scored, e.g. the prompt), else ``input_ids`` with padding (``attention_mask == 0``) set to
    ``-100``. Position t's logits predict token t + 1.

    - loss ``[B]``: Σ over scored tokens of −log p(y_{t+1} | y_≤t) — SUMMED over tokens (not
      averaged), so every token weighs the same in the mean training objective;
    - ``measurement="loss"`` (default): the same sum on the query, i.e. −log p(completion | prompt)
      when the labels mark the completion; a score s > 0 then means the training sequence made
      the completion more likely (helpful), as everywhere in influencekit;
    - ``measurement="log_probability"``: log p(completion | prompt) = −loss (s > 0: harmful).

    Curvature: the exact Fisher would enumerate V^T label sequences, so this task has no
    :meth:`predictive_targets`; the default curvature is ``"ggn"`` — for cross-entropy on logits
    the Gauss-Newton matrix IS the true Fisher, and its products are exact (Jacobian-vector
    products), while K-FAC/EK-FAC estimate it from labels sampled from the model
    (:meth:`sample_targets`, seeded). ``kind="empirical_fisher"`` uses the data's own tokens.
    """

    default_curvature = "ggn"

    def __init__(self, measurement: str = "loss", label_key: str = "labels"):
        if measurement not in ("loss", "log_probability"):
            raise ValueError(f"measurement={measurement!r} is not 'loss' or 'log_probability'")
        self.measurement_name = measurement
        self.label_key = label_key

    def inputs(self, batch):
        return _model_inputs(batch, (self.label_key,))

    def forward(self, call, batch):
        return output_tensor(call(**self.inputs(batch)))

    def targets(self, batch):
        labels = batch.get(self.label_key) if isinstance(batch, dict) else None
        if labels is not None:
            return labels
        ids = _model_inputs(batch, ())["input_ids"]
        mask = _attention_mask(batch)
        return ids if mask is None else ids.masked_fill(~mask, IGNORE_INDEX)

    def token_mask(self, batch):
        return _attention_mask(batch)

    def token_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``[B, T-1]``: −log p of each next token (0 where the target is ``-100``)."""
        logits = outputs[:, :-1]
        nxt = targets[:, 1:]
        flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), nxt.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="none")
        return flat.reshape(nxt.shape)

    def loss(self, outputs, targets):
        return self.token_losses(outputs, targets).sum(dim=1)

    def measurement(self, outputs, targets):
        value = self.loss(outputs, targets)
        return value if self.measurement_name == "loss" else -value

    def token_measurements(self, outputs, targets):
        """``[B, T]``: the measurement's term of each token: column τ is the loss of predicting
        token τ (from position τ − 1), or its negative for ``"log_probability"``; 0 at τ = 0 and
        where the label is ``-100`` (prompt, padding). Sums over T to :meth:`measurement`."""
        per_token = self.token_losses(outputs, targets)
        out = torch.nn.functional.pad(per_token, (1, 0))
        return out if self.measurement_name == "loss" else -out

    def sample_targets(self, outputs, targets, generator):
        """Next tokens drawn from the model at every scored position (``-100`` kept)."""
        probs = outputs[:, :-1].detach().to(torch.float64).softmax(dim=-1)
        flat = probs.reshape(-1, probs.shape[-1]).cpu()
        draws = torch.multinomial(flat, 1, generator=generator)[:, 0]
        drawn = draws.reshape(probs.shape[:2]).to(targets.device)
        sampled = targets.clone()
        scored = targets[:, 1:] != IGNORE_INDEX
        sampled[:, 1:] = torch.where(scored, drawn, targets[:, 1:])
        return sampled

    def describe_measurement(self) -> str:
        return ("negative log-likelihood of the completion" if self.measurement_name == "loss"
                else "log-probability of the completion")
