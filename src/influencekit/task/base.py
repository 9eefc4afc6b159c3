"""Task: how the model is called on a batch, and what its outputs mean.

A Task is the one place that knows the layout of a batch and the model's calling convention:

- :meth:`Task.forward` receives ``call`` — the model bound to the parameters being
  differentiated, taking positional and keyword arguments exactly like ``model(...)`` — and the
  batch, and returns the output tensor the loss reads (``ModelOutput.logits`` for Hugging Face
  models; see :func:`output_tensor`);
- :meth:`Task.loss` / :meth:`Task.measurement` turn outputs and targets into one value per
  example ``[B]``;
- :meth:`Task.token_mask` says which tokens of a sequence are real (``[B, T]``, padding False);
  K-FAC statistics and token-wise scores honour it, and every built-in loss ignores padding.

The default layout is a tuple ``(inputs, targets, ...)`` and ``model(inputs)``; override
:meth:`inputs` / :meth:`targets` / :meth:`forward` for anything else (dict batches, several
inputs, keyword arguments). Built-in tasks for Hugging Face models: :mod:`.huggingface`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from ..errors import BatchLayoutError, InfluenceKitError
from .checks import describe_layout

ModelCall = Callable[..., object]


def output_tensor(output) -> torch.Tensor:
    """The tensor a loss reads from a model's return value.

    A tensor is returned as is; an object with ``.logits`` (a Hugging Face ``ModelOutput``) gives
    its logits; a tuple or list gives its first element.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"the model returned {type(output).__name__}, which is neither a tensor, a tuple whose "
        "first element is a tensor, nor an object with .logits; override Task.forward to say "
        "which tensor the loss reads.")


class Task(ABC):
    """Per-example loss ``[B]`` and measurement ``[B]`` computed from model outputs.

    Subclasses implement :meth:`loss`. The measurement f defaults to the loss; the influence
    ``score`` of a training example on f is ``g_qᵀ (C + λI)⁻¹ g_m`` with ``g_q = ∇θ f``.
    """

    #: The curvature kind this task is meant for (``ik.Curvature(..., kind=None)`` uses it).
    default_curvature = "ggn"
    #: Whether K-FAC/EK-FAC's ``labels="auto"`` takes the exact enumeration when
    #: :meth:`predictive_targets` exists (False where it costs one backward pass per target,
    #: e.g. a language model's (position, token) pairs: ``"auto"`` then samples).
    exact_labels_by_default = True
    #: Whether :meth:`predictive_targets` is called as ``predictive_targets(outputs, targets)``
    #: with the batch's true targets (which mark positions that are not scored).
    predictive_targets_take_targets = False

    def forward(self, call: ModelCall, batch) -> torch.Tensor:
        """Call the model on a batch and return the output tensor the loss reads.

        ``call`` behaves like the model (``call(x)``, ``call(**inputs)``) with the parameters
        being differentiated. Default: ``output_tensor(call(self.inputs(batch)))``.
        """
        return output_tensor(call(self.inputs(batch)))

    def inputs(self, batch):
        """What the model is called on (default: ``batch[0]``)."""
        return batch[0]

    def targets(self, batch):
        """What the loss compares the outputs with (default: ``batch[1]``)."""
        return batch[1]

    def token_mask(self, batch) -> torch.Tensor | None:
        """``[B, T]`` bool, True for real tokens (False for padding); None when the examples
        have no token dimension or no padding."""
        return None

    # -- validation (called once per batch by Target.batch_validator) ------------------------------
    def check_layout(self, batch) -> None:
        """Raise :class:`~influencekit.errors.BatchLayoutError` if ``batch`` does not have the
        layout this task reads.

        Default: when :meth:`targets` (or both :meth:`inputs` and :meth:`forward`) are not
        overridden, the batch must be a tuple or list ``(inputs, targets, ...)``.
        """
        cls = type(self)
        reads_tuples = cls.targets is Task.targets or (cls.inputs is Task.inputs
                                                       and cls.forward is Task.forward)
        if not reads_tuples or (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            return
        if isinstance(batch, dict):
            fix = ("For dict batches (Hugging Face style: the model is called with the entries "
                   "as keyword arguments) use ik.SequenceClassificationTask or ik.CausalLMTask; "
                   "otherwise subclass the task and override inputs(batch) and targets(batch), "
                   "e.g. return batch['x'] and batch['y'].")
        else:
            fix = ("Pass inputs and targets together, e.g. (x, y) or TensorDataset(x, y), or "
                   "subclass the task and override inputs(batch) and targets(batch).")
        raise BatchLayoutError(f"{cls.__name__} reads batches laid out as (inputs, targets, ...) "
                               f"tuples, but {describe_layout(batch)}. {fix}")

    def check_targets(self, targets, outputs: torch.Tensor, start: int) -> None:
        """Raise :class:`~influencekit.errors.LabelError` naming the first example (position
        ``start`` + row) whose target this task cannot use with the model's ``outputs``.

        ``outputs`` are the model's outputs on ONE example of the data (the same for every
        batch of a pass: only their trailing shape may be used). Default: no check.
        """
        return None

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets) -> torch.Tensor:
        """Per-example training loss, shape ``[B]`` (not reduced over the batch)."""

    def measurement(self, outputs: torch.Tensor, targets) -> torch.Tensor:
        """Per-example measurement f, shape ``[B]``; by default the loss."""
        return self.loss(outputs, targets)

    def token_measurements(self, outputs: torch.Tensor, targets) -> torch.Tensor:
        """``[B, T]``: the measurement split over the tokens of each example (summing over T to
        :meth:`measurement`), for scores per query token. Not defined by default."""
        raise InfluenceKitError(
            f"{type(self).__name__} does not split its measurement over tokens "
            "(token_measurements); scores per query token need it. Use a task that does "
            "(ik.CausalLMTask), or implement token_measurements(outputs, targets) -> [B, T].")

    def predictive_targets(self, outputs: torch.Tensor):
        """Targets of the model's own predictive distribution, enumerated exactly.

        Returns ``(targets, probabilities)``: ``targets`` is a sequence of S target batches and
        ``probabilities`` a ``[S, B]`` tensor of their weights (each column sums to one; a
        causal language model's to its number of scored positions, one distribution each), chosen
        so that the weighted sum of gradient outer products is the exact Fisher. Tasks whose
        distribution cannot be enumerated (a language model: V^T sequences) raise
        ``NotImplementedError`` and implement :meth:`sample_targets` instead.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not define predictive_targets(); the exact Fisher needs "
            "it. Use kind='ggn' or kind='empirical_fisher', or a sampled Fisher.")

    @property
    def enumerates_targets(self) -> bool:
        """Whether :meth:`predictive_targets` is implemented (the exact Fisher is available)."""
        return type(self).predictive_targets is not Task.predictive_targets

    @property
    def samples_targets(self) -> bool:
        """Whether targets can be drawn from the model (:meth:`sample_targets` or an
        enumeration to draw from)."""
        return (self.enumerates_targets
                or type(self).sample_targets is not Task.sample_targets)

    def sample_targets(self, outputs: torch.Tensor, targets, generator: torch.Generator):
        """One batch of targets drawn from the model's predictive distribution (same layout as
        ``targets``, which marks what is ignored, e.g. padding); for the sampled Fisher.

        Default: a draw from :meth:`predictive_targets`.
        """
        choices, probs = self.predictive_targets(outputs.detach())
        draw = torch.multinomial(probs.T.to(torch.float64).cpu(), 1, generator=generator)[:, 0]
        stacked = torch.stack(list(choices))                                  # [S, B, ...]
        rows = torch.arange(stacked.shape[1])
        return stacked[draw.to(stacked.device), rows.to(stacked.device)]

    def describe_measurement(self) -> str:
        """A short human name of the measurement, used in reports."""
        return "loss"
