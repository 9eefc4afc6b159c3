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

from ..errors import BatchLayoutError, InfluenceKitError, LabelError, TaskOutputShapeError
from .base import Task, output_tensor
from .checks import describe_layout
from .classification import IGNORE_INDEX, ClassificationTask


def _model_inputs(batch: dict, exclude: tuple[str, ...]) -> dict:
    if not isinstance(batch, dict):
        raise TypeError(f"this task reads dict batches (as a tokenizer returns them), got "
                        f"{type(batch).__name__}; build the data set from a dict of tensors, "
                        "e.g. ik.grads.DictDataset({'input_ids': ..., 'labels': ...}).")
    return {k: v for k, v in batch.items() if k not in exclude}


def _check_dict_layout(task, batch, required: tuple[str, ...]) -> None:
    """Raise :class:`BatchLayoutError` unless ``batch`` is a dict holding one of ``required``
    (every key is required when ``required`` has one entry) and some model input."""
    name = type(task).__name__
    if not isinstance(batch, dict):
        raise BatchLayoutError(
            f"{name} reads dict batches (as a tokenizer returns them), but "
            f"{describe_layout(batch)}. Build the data set from a dict of tensors, e.g. "
            "ik.grads.DictDataset({'input_ids': ..., 'attention_mask': ..., 'labels': ...}), "
            "or use ik.ClassificationTask for (inputs, labels) tuples.")
    if not any(key in batch for key in required):
        raise BatchLayoutError(
            f"{name} found none of the keys {list(required)} in the batch, whose keys are "
            f"{list(batch)}. Name the labels' key with {name}(label_key=...).")


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

    def check_layout(self, batch):
        _check_dict_layout(self, batch, (self.label_key,))


#: Most (position, token) label sets :meth:`CausalLMTask.predictive_targets` enumerates per
#: batch (each is one backward pass).
MAX_EXACT_LABEL_SETS = 20_000

#: Elements of the logits turned into float64 probabilities at once by
#: :meth:`CausalLMTask.sample_targets`.
SAMPLE_CHUNK = 1 << 22


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

    Curvature: the default is ``"ggn"`` — for cross-entropy on logits the Gauss-Newton matrix
    IS the true Fisher, and its products are exact (Jacobian-vector products). K-FAC/EK-FAC
    estimate it from labels: by default sampled from the model (:meth:`sample_targets`,
    seeded); ``labels="exact"`` enumerates every (position, token) pair
    (:meth:`predictive_targets`, one backward pass each: small vocabularies only).
    ``kind="empirical_fisher"`` uses the data's own tokens.
    """

    default_curvature = "ggn"
    exact_labels_by_default = False
    predictive_targets_take_targets = True

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

    def check_layout(self, batch):
        _check_dict_layout(self, batch, (self.label_key, "input_ids"))

    def check_targets(self, targets, outputs, start):
        """Next-token targets ``[B, T]`` must be integer token ids in ``[0, V)`` for logits
        ``[B, T, V]``, or ``-100`` (not scored)."""
        if outputs.dim() != 3:
            raise TaskOutputShapeError(
                f"CausalLMTask reads logits [B, T, V] from the model, but it returns shape "
                f"{list(outputs.shape)} for one example.")
        if (not isinstance(targets, torch.Tensor) or targets.is_floating_point()
                or targets.dim() != 2):
            shown = (f"shape {list(targets.shape)} {targets.dtype}"
                     if isinstance(targets, torch.Tensor) else type(targets).__name__)
            raise LabelError(
                f"the token targets of the batch starting at example {start} are {shown}; "
                "CausalLMTask needs integer token ids [B, T] (-100 for tokens not scored).",
                index=start)
        vocab = outputs.shape[-1]
        bad = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= vocab)
        if bad.any():
            row, token = (int(v) for v in bad.nonzero()[0])
            raise LabelError(
                f"token {token} of example {start + row} has target id "
                f"{int(targets[row, token])}, outside the model's vocabulary of {vocab} "
                "(0 to {}; -100 marks a token that is not scored). Check the tokenizer matches "
                "the model.".format(vocab - 1), index=start + row)

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

    def predictive_targets(self, outputs, targets=None):
        """The exact expectation over the model's next-token labels, one scored position at a
        time: ``(targets, weights [S, B])`` with S = (T − 1)·V label sets (order: position,
        then token). Set (τ, c) scores only position τ + 1, with token c (every other position
        ``-100``), weighted p(c | y_≤τ) of each example; positions that ``targets`` marks
        ``-100`` (padding, prompt) weigh 0, and sets no example scores are dropped.

        Why this is the exact Fisher (= the GGN) of the summed token losses: under the model the
        next tokens are independent given the sequence, and each token's gradient of
        −log p(y) has mean zero, so in E[g gᵀ] of the sequence gradient g = Σ_τ g_τ(y_τ) every
        cross term τ ≠ τ' vanishes and E[g gᵀ] = Σ_τ Σ_c p_τ(c) g_τ(c) g_τ(c)ᵀ. Each set costs
        one backward pass, so at most :data:`MAX_EXACT_LABEL_SETS` sets are allowed.
        """
        length, vocab = outputs.shape[1] - 1, outputs.shape[-1]
        if length * vocab > MAX_EXACT_LABEL_SETS:
            raise InfluenceKitError(
                f"labels='exact' on a causal language model takes one backward pass per "
                f"(position, token) pair: {length} x {vocab} = {length * vocab:,} per batch, "
                f"more than {MAX_EXACT_LABEL_SETS:,}. Use labels='sampled' (n_samples draws "
                "from the model; the default) for this model.")
        probs = outputs[:, :-1].detach().softmax(dim=-1, dtype=torch.float64)   # [B, T-1, V]
        if targets is not None:
            scored = targets[:, 1:] != IGNORE_INDEX
            probs = probs * scored[..., None].to(probs.device)
        size = outputs.shape[0]
        weights = probs.permute(1, 2, 0).reshape(length * vocab, size)          # [S, B]
        keep = weights.abs().sum(dim=1) > 0
        sets = []
        for s in keep.nonzero()[:, 0].tolist():
            tau, c = divmod(s, vocab)
            labels = torch.full((size, length + 1), IGNORE_INDEX, dtype=torch.long,
                                device=outputs.device)
            labels[:, tau + 1] = c
            sets.append(labels)
        return sets, weights[keep]

    def sample_targets(self, outputs, targets, generator):
        """Next tokens drawn from the model at every scored position (``-100`` kept).

        Probabilities in float64, a few positions at a time (``SAMPLE_CHUNK`` elements of the
        ``[B, T-1, vocab]`` logits): a large vocabulary's float64 copy is never formed whole."""
        logits = outputs.detach()
        length, vocab = logits.shape[1] - 1, logits.shape[-1]
        step = max(1, SAMPLE_CHUNK // max(1, vocab))
        if length < 1:  # one token: nothing is predicted
            return targets.clone()
        draws = torch.cat([
            torch.multinomial(logits[b, lo:min(lo + step, length)].softmax(
                dim=-1, dtype=torch.float64).cpu(), 1, generator=generator)[:, 0]
            for b in range(logits.shape[0]) for lo in range(0, length, step)])
        drawn = draws.reshape(logits.shape[0], length).to(targets.device)
        sampled = targets.clone()
        scored = targets[:, 1:] != IGNORE_INDEX
        sampled[:, 1:] = torch.where(scored, drawn, targets[:, 1:])
        return sampled

    def describe_measurement(self) -> str:
        return ("negative log-likelihood of the completion" if self.measurement_name == "loss"
                else "log-probability of the completion")
