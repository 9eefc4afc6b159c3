"""Target: a model, a Task and the parameters influence is taken with respect to.

The user's model is only ever called through ``torch.func.functional_call``: influencekit never
replaces, wraps or edits its modules and never writes its parameters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..errors import NoTrainableParametersError, TaskOutputShapeError
from ..func.params import ParamSpace
from .base import Task

ParamSelector = None | list[str] | Callable[[str, nn.Parameter], bool]


class Target:
    """What influence is computed for.

    Args:
        model: any ``nn.Module``; called as ``model(task.inputs(batch))``.
        task: per-example loss and measurement.
        params: which parameters: ``None`` (all with ``requires_grad``), a list of names, or a
            predicate ``(name, parameter) -> bool``.
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
            unknown = [n for n in params if n not in named]
            if unknown:
                raise ValueError(f"unknown parameter names {unknown}; the model has "
                                 f"{list(named)[:10]}{' ...' if len(named) > 10 else ''}")
            names = [n for n in named if n in set(params)]
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
        """Unselected parameters and buffers, cast like the selected ones."""
        out = {}
        for n, p in self.model.named_parameters():
            if n not in self.space.names:
                out[n] = p.detach().to(dtype=dtype or p.dtype, device=device)
        for n, b in self.model.named_buffers():
            cast = dtype if (dtype is not None and b.is_floating_point()) else b.dtype
            out[n] = b.to(dtype=cast, device=device)
        return out

    def fingerprint(self) -> str:
        """sha256 of the selected parameters' names, shapes and values (identifies a model)."""
        h = hashlib.sha256()
        for name, value in self.params().items():
            h.update(name.encode())
            h.update(str(tuple(value.shape)).encode())
            h.update(value.to(torch.float64).cpu().numpy().tobytes())
        return h.hexdigest()

    # -- evaluation ---------------------------------------------------------------------------
    def outputs(self, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """Model outputs with the selected parameters replaced by ``params``."""
        return self.outputs_from_inputs(params, self.task.inputs(batch))

    def outputs_from_inputs(self, params: dict[str, torch.Tensor], inputs) -> torch.Tensor:
        """``model(inputs)`` with the selected parameters replaced by ``params``."""
        some = next(iter(params.values()))
        frozen = self._frozen(some.dtype, some.device)
        inputs = _cast_floating(inputs, some.dtype, some.device)
        return functional_call(self.model, (params, frozen), (inputs,))

    def losses(self, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """Per-example training losses ``[B]`` (without the regulariser)."""
        out = self.outputs(params, batch)
        values = self.task.loss(out, self._targets(batch, out))
        return self._check_shape(values, out, "loss")

    def measurements(self, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """Per-example measurements f ``[B]``."""
        out = self.outputs(params, batch)
        values = self.task.measurement(out, self._targets(batch, out))
        return self._check_shape(values, out, "measurement")

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

    def _targets(self, batch, outputs):
        return _cast_floating(self.task.targets(batch), outputs.dtype, outputs.device)

    def _check_shape(self, values: torch.Tensor, outputs: torch.Tensor, what: str):
        batch = outputs.shape[0] if outputs.dim() else 1
        if values.shape != (batch,):
            raise TaskOutputShapeError(
                f"{type(self.task).__name__}.{what} returned shape {tuple(values.shape)}; it must "
                f"return one value per example, shape [B] = [{batch}]. Do not reduce over the "
                "batch (use reduction='none') and sum over any other dimension.")
        return values


def _cast_floating(value, dtype, device):
    """Move tensors (also inside tuples/lists/dicts) to device; cast floating ones to dtype."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            return value.to(dtype=dtype, device=device)
        return value.to(device=device)
    if isinstance(value, dict):
        return {k: _cast_floating(v, dtype, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floating(v, dtype, device) for v in value)
    return value
