"""One gradient engine: per-example gradients of a Target, whatever the model.

Three ways to the same numbers (they agree to rounding; the tests hold them to 1e-8 in float64):

- ``"hooks"``: one batched forward and backward with layer hooks (:mod:`.capture`); per-example
  gradients are formed from each layer's inputs and output gradients (:mod:`.layers`). The fast
  path: about the cost of a plain forward+backward plus one small product per layer.
- ``"vmap"``: ``torch.func.vmap`` over examples of ``grad`` — any layer type, but the model must
  be traceable (no data-dependent Python control flow, e.g. Hugging Face attention-mask code).
- ``"loop"``: one backward pass per example — always works, slowest; also the test oracle.

``"auto"`` (the default, :attr:`influencekit.Runtime.engine`) uses hooks for every parameter in
a supported layer and, for the others, vmap — or the loop when vmap cannot trace the model (found
out on the first batch, then remembered).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..errors import InfluenceKitError, UnsupportedModuleError
from ..func.grads import per_example_gradients, per_example_gradients_loop
from .capture import LayerPass
from .data import batch_size
from .layers import (
    HookIncompatibleError,
    broadcast_input_error,
    split_layers,
    write_layer_grads,
)

ENGINES = ("auto", "hooks", "vmap", "loop")
logger = logging.getLogger(__name__)

#: What to differentiate: the task's ``"loss"``, its ``"measurement"``, or a function
#: ``fn(outputs, targets) -> [B]``.
Differentiated = str | Callable[[torch.Tensor, object], torch.Tensor]


class GradientEngine:
    """Per-example gradients ``{parameter name: [B, *shape]}`` of a Target on one batch.

    Args:
        target: the :class:`~influencekit.Target` (model, task, selected parameters).
        engine: ``"auto"``, ``"hooks"``, ``"vmap"`` or ``"loop"`` (module docstring).

    ``layers`` are the layers done by hooks, ``rest`` the parameter names done by vmap/loop,
    ``expanded`` the hooked layers whose batch-shared output is expanded per example.
    """

    def __init__(self, target, engine: str = "auto"):
        if engine not in ENGINES:
            raise InfluenceKitError(f"engine={engine!r} is not one of {ENGINES}")
        self.target = target
        self.engine = engine
        names = target.space.names
        if engine in ("vmap", "loop"):
            self.layers, self.rest = [], list(names)
        else:
            self.layers, self.rest = split_layers(target.model, names)
        if engine == "hooks" and self.rest:
            raise UnsupportedModuleError(
                f"engine='hooks' needs every selected parameter in a supported layer (Linear, "
                f"Conv2d, Conv1D, Embedding, LayerNorm, RMSNorm); these are not: "
                f"{self.rest[:8]}. Use engine='auto' (hooks where possible, vmap or a loop for "
                "the rest).")
        self.rest_method = engine if engine in ("vmap", "loop") else "vmap"
        self.shapes = dict(zip(names, target.space.shapes, strict=True))
        self.slices = target.space.slices()
        self.expanded: set[str] = set()
        self._shape_checked = False

    def __call__(self, params: dict[str, torch.Tensor], batch, of: Differentiated = "loss",
                 targets=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(values [B], {name: [B, *shape]})`` of ``of`` on ``batch`` at ``params``.

        ``targets`` replaces the batch's targets for the loss (sampled labels of the Fisher).
        """
        values, grads = self._compute(params, batch, of, targets, into=None)
        return values, {n: grads[n] for n in self.target.space.names}

    def flat(self, params: dict[str, torch.Tensor], batch, of: Differentiated = "loss",
             targets=None, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [B], grads [B, p])`` in the flat layout of ``target.space``: each layer
        writes straight into its column block (no per-parameter copies). ``out`` is reused when
        it has the right shape, dtype and device (a buffer the caller keeps between batches: a
        fresh ``[B, p]`` costs page faults on every batch)."""
        size = batch_size(batch)
        some = next(iter(params.values()))
        p = self.target.space.numel
        if out is None or out.shape != (size, p) or out.dtype != some.dtype \
                or out.device != some.device:
            out = torch.empty(size, p, dtype=some.dtype, device=some.device)
        into = {name: out[:, sl].view(size, *self.shapes[name])
                for name, sl in self.slices.items()}
        values, _ = self._compute(params, batch, of, targets, into=into)
        return values, out

    def _compute(self, params, batch, of, targets, into):
        """``(values, grads)``; with ``into`` the gradients are written there instead."""
        values, grads = None, {}
        if self.layers:
            try:
                values, grads = self._by_hooks(params, batch, of, targets, into)
            except HookIncompatibleError as exc:
                if not (exc.shared_input and self.expand_shared(params, batch, exc.module)):
                    if self.engine != "auto":
                        raise
                    self.demote(exc.module)
                return self._compute(params, batch, of, targets, into)
        if self.rest:
            rest_values, rest_grads = self._by_transform(params, batch, of, targets)
            values = rest_values if values is None else values
            if into is None:
                grads.update(rest_grads)
            else:
                for name, g in rest_grads.items():
                    into[name].copy_(g)
        return values, grads

    def loss_gradients_per_target_set(self, params: dict[str, torch.Tensor], batch,
                                      target_sets: Callable):
        """Yield ``(coef [B], {name: [B, *shape]})`` for every ``(targets, coef)`` of
        ``target_sets(outputs, true_targets)``: loss gradients under several label sets (the
        Fisher's), from ONE forward pass when every parameter goes through hooks."""
        if self.rest or not self.layers:
            with torch.no_grad():
                outputs = self.target.outputs(params, batch)
            for targets, coef in target_sets(outputs, self.target.targets(batch, outputs)):
                yield coef, self(params, batch, "loss", targets)[1]
            return
        live = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with LayerPass(self.target, self.layers, self.expanded) as lp:
            outputs = lp.forward(live, batch)
            inputs = dict(lp.inputs)
            self._check_batch_inputs(inputs, outputs.shape[0])
            true_targets = self.target.targets(batch, outputs)
            for targets, coef in target_sets(outputs.detach(), true_targets):
                values = self.values(outputs, batch, "loss", targets)
                out_grads = lp.backward(values, retain_graph=True)
                yield coef, self._assemble(lp, inputs, out_grads, values.dtype)

    # -- hooks ----------------------------------------------------------------------------------
    def _by_hooks(self, params, batch, of, targets, into=None):
        live = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with LayerPass(self.target, self.layers, self.expanded) as lp:
            outputs = lp.forward(live, batch)
            values = self.values(outputs, batch, of, targets)
            inputs = dict(lp.inputs)
            self._check_batch_inputs(inputs, values.shape[0])
            out_grads = lp.backward(values)
        return values.detach(), self._assemble(lp, inputs, out_grads, values.dtype, into)

    def expand_shared(self, params, batch, module: str) -> bool:
        """Keep hooked ``module``, whose input is shared by the batch, on hooks by expanding its
        output per example — if that leaves the model's outputs on ``batch`` bit for bit as
        they are (else the model does not just broadcast it over the examples). Returns
        whether it was added to :attr:`expanded`."""
        if module in self.expanded:
            return False
        fixed = {n: p.detach() for n, p in params.items()}
        layer = [lay for lay in self.layers if lay.name == module]
        with torch.no_grad():
            plain = self.target.outputs(fixed, batch)
            try:
                with LayerPass(self.target, layer, {module}) as lp:
                    expanded = lp.forward(fixed, batch)
            except RuntimeError:  # e.g. an in-place write into the expanded view
                return False
        same = expanded.shape == plain.shape and torch.equal(expanded, plain)
        if same:
            self.expanded.add(module)
            logger.info("module %r is shared by the batch; its output is expanded per example "
                        "so that it stays on hooks", module)
        return same

    def _check_batch_inputs(self, inputs, size):
        for layer in self.layers:
            got = inputs[layer.name].shape[0] if inputs[layer.name].dim() else 1
            if got != size:
                raise broadcast_input_error(layer.name, got, size)

    def _assemble(self, lp, inputs, out_grads, dtype, into=None) -> dict[str, torch.Tensor]:
        """Per-example gradients of the hooked parameters (tied ones summed over layers),
        returned, or written into ``into`` (then ``{}`` is returned)."""
        size = next(iter(inputs.values())).shape[0]
        if into is None:
            into = {name: torch.empty((size, *self.shapes[name]), dtype=dtype,
                                      device=next(iter(inputs.values())).device)
                    for layer in self.layers for name in (layer.weight, layer.bias) if name}
            returned = into
        else:
            returned = {}
        written: set[str] = set()
        for layer in self.layers:
            write_layer_grads(layer, lp.modules[layer.name], inputs[layer.name],
                              out_grads[layer.name], into, frozenset(written))
            written |= {n for n in (layer.weight, layer.bias) if n}
        return returned

    def demote(self, module: str) -> None:
        """Move a layer that hooks cannot handle (called twice per forward, or fed an input
        shared by the batch) to vmap/loop, with every layer tied to it by a shared parameter."""
        moved: set[str] = set()
        removed = {module}
        while True:
            for layer in self.layers:
                if layer.name in removed:
                    moved |= {n for n in (layer.weight, layer.bias) if n}
            more = {layer.name for layer in self.layers
                    if {layer.weight, layer.bias} & moved and layer.name not in removed}
            if not more:
                break
            removed |= more
        self.layers = [layer for layer in self.layers if layer.name not in removed]
        self.rest += [n for n in self.target.space.names if n in moved and n not in self.rest]
        logger.info("module %r cannot be hooked per example; %d parameters go through %s "
                    "instead", module, len(moved), self.rest_method)

    # -- vmap / loop ------------------------------------------------------------------------------
    def _by_transform(self, params, batch, of, targets):
        fixed = {n: p.detach() for n, p in params.items()}
        sub = {n: fixed[n] for n in self.rest}
        packed = (batch,) if targets is None else (batch, targets)

        def fn(p, example):
            example_batch = example[0]
            example_targets = example[1] if len(example) > 1 else None
            outputs = self.target.outputs({**fixed, **p}, example_batch)
            return self.values(outputs, example_batch, of, example_targets)

        if self.rest_method == "vmap":
            self._check_full_batch_shape(fn, sub, packed)
            try:
                return per_example_gradients(fn, sub, packed)
            except RuntimeError as exc:
                if "vmap" not in str(exc):
                    raise
                if self.engine == "vmap":
                    raise InfluenceKitError(
                        "engine='vmap' cannot trace this model (data-dependent control flow, "
                        "e.g. Hugging Face attention-mask code): "
                        f"{str(exc).splitlines()[0][:160]}. Use Runtime(engine='auto') (layer "
                        "hooks, and a per-example loop where needed) or engine='loop'."
                    ) from exc
                logger.info("vmap cannot trace this model (%s); per-example gradients of %d "
                            "parameters fall back to a loop", str(exc).split("\n")[0][:120],
                            len(self.rest))
                self.rest_method = "loop"
        return per_example_gradients_loop(fn, sub, packed)

    def _check_full_batch_shape(self, fn, sub, packed):
        if self._shape_checked:
            return
        with torch.no_grad():  # vmap sees one example at a time: check the [B] shape once
            fn(sub, packed)
        self._shape_checked = True

    # -- what is differentiated -------------------------------------------------------------
    def values(self, outputs: torch.Tensor, batch, of: Differentiated, targets=None):
        """Per-example values ``[B]`` of ``of`` from the model's outputs (shape-checked)."""
        target = self.target
        if of == "loss":
            return target.loss_from_outputs(outputs, batch, targets)
        if of == "measurement":
            return target.measurement_from_outputs(outputs, batch)
        if callable(of):
            values = of(outputs, target.targets(batch, outputs) if targets is None else targets)
            return target.check_per_example(values, outputs, getattr(of, "__name__", "value"))
        raise InfluenceKitError(f"of={of!r} is not 'loss', 'measurement' or a function "
                                "(outputs, targets) -> [B]")

