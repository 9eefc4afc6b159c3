"""Target: a model, a Task and the parameters influence is taken with respect to.

The user's model is only ever called through ``torch.func.functional_call``: influencekit never
replaces, wraps or edits its modules, never writes its parameters, never switches its mode and
never updates its buffers (running statistics of a normalisation module in training mode are
given to the call as copies).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..errors import InfluenceKitError, NoTrainableParametersError, TaskOutputShapeError
from ..func.params import ParamSpace
from ..grads.data import cast_batch
from .base import Task
from .checks import BatchValidator, running_stat_buffers

ParamSelector = None | list[str] | Callable[[str, nn.Parameter], bool]


class Target:
    """What influence is computed for.

    Args:
        model: any ``nn.Module``; the task calls it (``task.forward``: ``model(batch[0])`` by
            default, keyword arguments and ``ModelOutput`` for Hugging Face tasks).
        task: per-example loss and measurement.
        params: which parameters: ``None`` (all with ``requires_grad``), a list of parameter or
            module names (a module stands for all its parameters), or a predicate
            ``(name, parameter) -> bool``.
        regularizer: optional R(θ) (a callable on the dict of selected parameters returning a
            scalar) added to the weighted-mean training loss ``Σ w_i ℓ_i / Σ w_i``.

    The training objective is ``L(θ, w) = Σ_i w_i ℓ(z_i, θ) / Σ_i w_i + R(θ)``.
    """

    def __init__(self, model: nn.Module, task: Task, params: ParamSelector = None,
                 regularizer: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None):
        self.model = model
        self.task = task
        self.regularizer = regularizer
        self._names = self._select(model, params)
        self.space = ParamSpace.from_params({n: p for n, p in model.named_parameters()
                                             if n in self._names})

    @staticmethod
    def _select(model: nn.Module, params: ParamSelector) -> tuple[str, ...]:
        named = dict(model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        elif callable(params):
            names = [n for n, p in named.items() if params(n, p)]
        else:
            if isinstance(params, str):
                params = [params]
            chosen = set()
            for entry in params:
                # a parameter name, or a module name standing for all its parameters
                hits = [n for n in named if n == entry or n.startswith(entry + ".")]
                if not hits:
                    raise InfluenceKitError(
                        f"{entry!r} is neither a parameter nor a module holding parameters; the "
                        f"model has {list(named)[:10]}{' ...' if len(named) > 10 else ''}")
                chosen.update(hits)
            names = [n for n in named if n in chosen]
        if not names:
            raise NoTrainableParametersError(
                "no parameter selected: the model has no parameter with requires_grad=True "
                "(or the params= selection matched none). Set requires_grad=True on the "
                "parameters to study, or pass params=[names] to Target.")
        return tuple(names)

    # -- parameters ---------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """p, the length of the flat parameter vector."""
        return self.space.numel

    def params(self, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Detached copies of the selected parameters' current values."""
        named = dict(self.model.named_parameters())
        return {n: named[n].detach().to(dtype=dtype or named[n].dtype, device=device)
                for n in self.space.names}

    def flat_params(self, dtype=None, device=None) -> torch.Tensor:
        """The selected parameters as one vector ``[p]``."""
        return self.space.flatten(self.params(dtype, device))

    def _frozen(self, dtype, device) -> dict[str, torch.Tensor]:
        """Unselected parameters and buffers, cast like the selected ones; buffers a forward
        pass would update in place (running statistics in training mode) are copies."""
        out = {}
        for n, p in self.model.named_parameters():
            if n not in self.space.names:
                out[n] = p.detach().to(dtype=dtype or p.dtype, device=device)
        updated = running_stat_buffers(self.model)
        for n, b in self.model.named_buffers():
            cast = dtype if (dtype is not None and b.is_floating_point()) else b.dtype
            value = b.detach().to(dtype=cast, device=device)
            out[n] = value.clone() if n in updated and value.data_ptr() == b.data_ptr() else value
        return out

    def batch_validator(self, training: bool = False) -> BatchValidator:
        """A fresh check for one pass over a data set: ``check(batch, start)`` validates a batch
        whose first example is at position ``start`` (model mode, layout, NaN, a probe of the
        model on one example, labels; :mod:`influencekit.task.checks`). Give it to
        :func:`influencekit.grads.iter_batches` as ``check=``. ``training=True`` (the training
        loop) allows a model in training mode."""
        return BatchValidator(self, training=training)

    def fingerprint(self) -> str:
        """sha256 of the selected parameters' names, shapes and values (identifies a model)."""
        h = hashlib.sha256()
        for name, value in self.params().items():
            h.update(name.encode())
            h.update(str(tuple(value.shape)).encode())
            h.update(value.to(torch.float64).cpu().numpy().tobytes())
        return h.hexdigest()

    # -- evaluation ---------------------------------------------------------------------------
    def model_call(self, params: dict[str, torch.Tensor]):
        """The model as a function of its inputs, with the selected parameters replaced by
        ``params`` (and the others and the buffers cast to their dtype and device).

        ``call(*args, **kwargs)`` is ``model(*args, **kwargs)`` through
        ``torch.func.functional_call``; the user's module is never edited.
        """
        some = next(iter(params.values()))
        frozen = self._frozen(some.dtype, some.device)

        def call(*args, **kwargs):
            return functional_call(self.model, (params, frozen), args, kwargs)
        return call

    def outputs(self, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """The output tensor the loss reads (``task.forward``), with the selected parameters
        replaced by ``params``; floating inputs are cast to their dtype."""
        some = next(iter(params.values()))
        batch = cast_batch(batch, some.dtype, some.device)
        return self.task.forward(self.model_call(params), batch)

    def losses(self, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """Per-example training losses ``[B]`` (without the regulariser)."""
        out = self.outputs(params, batch)
        return self.loss_from_outputs(out, batch)

    def measurements(self, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """Per-example measurements f ``[B]``."""
        out = self.outputs(params, batch)
        return self.measurement_from_outputs(out, batch)

    def loss_from_outputs(self, outputs: torch.Tensor, batch, targets=None) -> torch.Tensor:
        """``task.loss`` of outputs against the batch's targets (or ``targets``), checked to be
        ``[B]``."""
        targets = self.targets(batch, outputs) if targets is None else targets
        return self.check_per_example(self.task.loss(outputs, targets), outputs, "loss")

    def measurement_from_outputs(self, outputs: torch.Tensor, batch) -> torch.Tensor:
        """``task.measurement`` of outputs against the batch's targets, checked to be ``[B]``."""
        values = self.task.measurement(outputs, self.targets(batch, outputs))
        return self.check_per_example(values, outputs, "measurement")

    def regularization(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """R(θ), a scalar (zero without a regulariser)."""
        if self.regularizer is None:
            some = next(iter(params.values()))
            return torch.zeros((), dtype=some.dtype, device=some.device)
        return self.regularizer(params)

    def objective(self, params, batches_and_weights) -> torch.Tensor:
        """``Σ w_i ℓ_i / Σ w_i + R`` over an iterable of ``(batch, weights[B])``."""
        total, weight = 0.0, 0.0
        for batch, w in batches_and_weights:
            total = total + (w * self.losses(params, batch)).sum()
            weight = weight + w.sum()
        return total / weight + self.regularization(params)

    def targets(self, batch, outputs: torch.Tensor):
        """The batch's targets, floating ones cast to the outputs' dtype and device."""
        return cast_batch(self.task.targets(batch), outputs.dtype, outputs.device)

    def token_mask(self, batch) -> torch.Tensor | None:
        """``[B, T]`` bool mask of real tokens from the task (None: no token dimension)."""
        return self.task.token_mask(batch)

    def check_per_example(self, values: torch.Tensor, outputs: torch.Tensor, what: str):
        """Raise :class:`TaskOutputShapeError` unless ``values`` has shape ``[B]``."""
        batch = outputs.shape[0] if outputs.dim() else 1
        if not isinstance(values, torch.Tensor) or values.shape != (batch,):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values)
            raise TaskOutputShapeError(
                f"{type(self.task).__name__}.{what} returned shape {shape}; it must "
                f"return one value per example, shape [B] = [{batch}]. Do not reduce over the "
                "batch (use reduction='none') and sum over any other dimension.")
        return values
