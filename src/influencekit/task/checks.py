"""Validation of the user's data and model against the Task, in one place.

:meth:`Target.batch_validator` returns a :class:`BatchValidator`; the data layer
(:func:`influencekit.grads.iter_batches`, ``check=``) calls it on every batch before any
algorithm sees it, with the position of the batch's first example. So every path that computes
gradients, curvature, influence or a retraining response gets the same checks, once per batch,
on concrete tensors (never inside a per-example transform). Each refusal is an
:class:`~influencekit.errors.InfluenceKitError` that names the example (its position in the data
set; ``error.index``), the problem and the fix:

1. the model's mode (first batch of a pass): dropout or batch normalisation in training mode
   (:class:`~influencekit.errors.TrainingModeError`);
2. the batch's layout as the Task reads it (:meth:`Task.check_layout`): a dict batch given to
   a task that reads ``(inputs, targets)`` tuples, a missing key
   (:class:`~influencekit.errors.BatchLayoutError`);
3. NaN in any floating input or target (:class:`~influencekit.errors.NonFiniteError` naming the
   example and the field);
4. a probe (first batch of a pass): the model is called on the batch's first example alone.
   An integer feature tensor fed to a floating model gives
   :class:`~influencekit.errors.InputDtypeError`, any other exception of the model
   :class:`~influencekit.errors.ModelCallError` (the original as its cause); the Task's loss and
   measurement must return one value per example (``reduction='none'``:
   :class:`~influencekit.errors.TaskOutputShapeError`);
5. the targets against the model's outputs (:meth:`Task.check_targets`): classification labels
   must be integers in ``[0, K)`` — the ignore index ``-100`` is refused, because
   cross-entropy would give that example a zero loss and a meaningless score; regression
   targets must have one value per model output (:class:`~influencekit.errors.LabelError`).

The cost: one forward pass of ONE example per pass over the data, and a few reductions over
each batch's inputs and labels.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import (
    BatchLayoutError,
    InfluenceKitError,
    InputDtypeError,
    ModelCallError,
    NonFiniteError,
    TrainingModeError,
)
from ..grads.data import batch_rows, batch_size

#: Modules whose output depends on the training mode (dropout: chance; batch norm: the batch).
_DROPOUT = nn.modules.dropout._DropoutNd
_NORM = nn.modules.batchnorm._NormBase
_BATCH_NORM = nn.modules.batchnorm._BatchNorm
_DTYPE_MESSAGE = re.compile(r"dtype|scalar type|Input type|expected .*(Float|Double|Half)",
                            re.IGNORECASE)


def mode_dependent_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the modules in training mode whose output then differs from eval
    mode: dropout with ``p > 0``, batch norm, instance norm that tracks running statistics."""
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, _DROPOUT) and module.p > 0:
            found.append((name, module))
        elif isinstance(module, _BATCH_NORM) or (isinstance(module, _NORM)
                                                  and module.track_running_stats):
            found.append((name, module))
    return found


def check_eval_mode(model: nn.Module) -> None:
    """Raise :class:`TrainingModeError` if :func:`mode_dependent_modules` finds any."""
    found = mode_dependent_modules(model)
    if not found:
        return
    shown = ", ".join(f"'{name or '(the model)'}' ({type(m).__name__}"
                      f"{f', p={m.p}' if isinstance(m, _DROPOUT) else ''})"
                      for name, m in found[:4]) + (" ..." if len(found) > 4 else "")
    raise TrainingModeError(
        f"the model is in training mode with {len(found)} module(s) that behave differently "
        f"there: {shown}. In training mode dropout makes every gradient random and batch "
        "normalisation mixes the examples of a batch (and would update its running "
        "statistics), so influence is not defined. Call model.eval() before using "
        "influencekit; it computes the influence of the model as evaluated (influencekit never "
        "switches the mode itself).")


def running_stat_buffers(model: nn.Module) -> set[str]:
    """Names of the buffers a forward pass would update in place (running statistics of
    normalisation modules in training mode): the Target passes copies of these."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, _NORM) and module.training and module.track_running_stats:
            for name, _ in module.named_buffers(recurse=False):
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


def _fields(value, path: str = ""):
    """``(path, tensor)`` of every tensor inside a batch: ``""`` for a bare tensor, else the
    indexing that reaches it (``[0]``, ``['input_ids']``)."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _fields(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _fields(item, f"{path}[{i}]")


def _where(path: str, whole: str) -> str:
    """Words for a field found by :func:`_fields` (``whole`` names a bare tensor)."""
    return f"{whole}{path}" if path else whole


def check_no_nan(batch, start: int) -> None:
    """Raise :class:`NonFiniteError` naming the first example with a NaN in a floating
    field of the batch."""
    size = batch_size(batch)
    for path, tensor in _fields(batch):
        if not tensor.is_floating_point() or not tensor.dim() or tensor.shape[0] != size:
            continue
        bad = torch.isnan(tensor.reshape(size, -1)).any(dim=1)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise NonFiniteError(
                f"example {start + i} holds NaN (in {_where(path, 'batch')}). Fix or remove "
                "that example (torch.utils.data.Subset of the others) before computing "
                "influence.", index=start + i)


class BatchValidator:
    """Checks one pass over a data set, batch by batch (see the module docstring).

    Call ``validator(batch, start)`` with each batch (after casting) and the position of its
    first example. ``training=True`` (the training loop) skips the model-mode check: training in
    training mode is the user's choice; running statistics are still never updated.
    """

    def __init__(self, target, training: bool = False):
        self.target = target
        self.training = training
        self._probe_outputs: torch.Tensor | None = None

    def __call__(self, batch, start) -> None:
        task = self.target.task
        first = self._probe_outputs is None
        if first and not self.training:
            check_eval_mode(self.target.model)
        task.check_layout(batch)
        check_no_nan(batch, start)
        if first:
            self._probe_outputs = self._probe(batch, start)  # checks this batch's targets
        else:
            task.check_targets(read_targets(task, batch, start), self._probe_outputs, start)

    def _probe(self, batch, start: int) -> torch.Tensor:
        """The model's outputs on the batch's first example alone (no gradients); the batch's
        targets are checked against them, then the Task's loss and measurement on that example
        are shape-checked."""
        target, task = self.target, self.target.task
        one = batch_rows(batch, slice(0, 1))
        with torch.no_grad():
            try:
                outputs = target.outputs(target.params(), one)
            except InfluenceKitError:
                raise
            except Exception as exc:
                raise _call_error(target, one, start, exc) from exc
            if not isinstance(outputs, torch.Tensor) or not outputs.dim():
                got = ("a 0-d tensor" if isinstance(outputs, torch.Tensor)
                       else type(outputs).__name__)
                raise ModelCallError(
                    f"{type(task).__name__}.forward returned {got} for example {start}; it must "
                    "return the output tensor whose first dimension is the batch.", index=start)
            task.check_targets(read_targets(task, batch, start), outputs, start)
            for what, compute in (("loss", target.loss_from_outputs),
                                  ("measurement", target.measurement_from_outputs)):
                try:
                    compute(outputs, one)
                except InfluenceKitError:
                    raise
                except Exception as exc:
                    raise ModelCallError(
                        f"{type(task).__name__}.{what} raised {type(exc).__name__} on example "
                        f"{start}: {exc}", index=start) from exc
        return outputs


def read_targets(task, batch, start: int):
    """``task.targets(batch)``; an exception becomes a :class:`BatchLayoutError`."""
    try:
        return task.targets(batch)
    except InfluenceKitError:
        raise
    except Exception as exc:
        raise BatchLayoutError(
            f"{type(task).__name__}.targets could not read the targets of the batch starting "
            f"at example {start} ({type(exc).__name__}: {exc}); {describe_layout(batch)}. "
            "Override Task.targets to say where the targets are.", index=start) from exc


def describe_layout(batch) -> str:
    """A few words on a batch's layout, for error messages."""
    if isinstance(batch, dict):
        return f"the batch is a dict with keys {list(batch)}"
    if isinstance(batch, (tuple, list)):
        return (f"the batch is a {type(batch).__name__} of {len(batch)} entries "
                f"({', '.join(_describe(v) for v in batch)})")
    return f"the batch is a {_describe(batch)}"


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {list(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return type(value).__name__


def _call_error(target, one, start: int, exc: Exception) -> InfluenceKitError:
    """The error to raise when calling the model on one example raised ``exc``."""
    task = target.task
    try:
        inputs = task.inputs(one)
    except Exception:  # the layout check passed; report what we have
        inputs = one
    integer = [(path, t) for path, t in _fields(inputs)
               if not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool]
    floating = any(p.is_floating_point() for p in target.model.parameters())
    if integer and floating and _DTYPE_MESSAGE.search(str(exc)):
        path, tensor = integer[0]
        dtype = str(tensor.dtype).replace("torch.", "")
        where = "the model's input" if not path else f"the model input at {path}"
        return InputDtypeError(
            f"{where} of example {start} is {dtype} (integers) but the model "
            f"computes in floating point ({str(exc).splitlines()[0]}). "
            "Convert the features to a floating dtype (x.float(), or x.double()) before passing "
            "them; influencekit casts floating inputs to the compute dtype and leaves integer "
            "tensors (labels, token ids) as they are.", index=start)
    hint = ""
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 1:
        hint = (" The input tensor has one dimension (the examples): if each example is a "
                "single number, give it a feature dimension, x[:, None].")
    return ModelCallError(
        f"calling the model on example {start} raised {type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}. {type(task).__name__} called it with "
        f"{_describe_inputs(inputs)}; check that the data's layout matches the model, or "
        f"override Task.forward / Task.inputs.{hint}", index=start)


def _describe_inputs(inputs) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"a {_describe(inputs)} (one example)"
    parts = [f"{_where(path, 'inputs')}: {_describe(t)}" for path, t in _fields(inputs)]
    return "{" + ", ".join(parts) + "} (one example)"
