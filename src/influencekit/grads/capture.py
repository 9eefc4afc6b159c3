"""Layer hooks: one forward pass recording each layer's input, then output gradients per backward.

:class:`LayerCapture` is a context manager that registers one forward hook per chosen module and
removes every handle when the block ends, also when it ends with an exception. The forward hook
keeps the module's input and registers a *tensor* hook on the module's output; that tensor hook
receives ∂(backpropagated scalar)/∂output during backward. Tensor hooks live on the autograd
graph, not on the module, and they see the gradient of the output as the module returned it even
when a later in-place operation (``ReLU(inplace=True)``) modifies it. No module is replaced,
wrapped or edited: the user's modules keep their identity and, after the block, their hook
dictionaries are as before. (With ``probe=True``, as :class:`LayerPass` uses it, the forward
hook returns the output plus a zero scalar leaf: the same values, and a backward pass can ask
for the probes' gradients instead of any parameter's.)

Module hooks fire under ``torch.func.functional_call`` (the way the Target calls the model):
``functional_call`` swaps parameters for the call and runs ``model(...)`` through the ordinary
``Module.__call__``, so forward hooks run and the outputs belong to the graph of the parameters
passed in. They do NOT run inside ``vmap``/``grad`` transforms.

:class:`LayerPass` is the unit every layer-wise computation is built from (per-example
gradients, K-FAC statistics, factored scores): ``outputs = lp.forward(params, batch)``, then any
number of ``lp.backward(values)`` calls, each returning ``{layer: ∂(Σ values)/∂output}``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .data import batch_size
from .layers import Layer, check_single_use


class LayerCapture:
    """Context manager: record inputs and output gradients of chosen modules.

    ``with LayerCapture({name: module}) as cap:`` registers one forward hook per module and
    removes all of them on exit, whatever happens inside. After a forward pass
    ``cap.inputs[name]`` is the module's (detached) first input; after each backward pass
    ``cap.output_grads[name]`` is the gradient of the backpropagated scalar w.r.t. the module's
    output. Call :meth:`reset` before each forward pass. A module called twice in one forward
    pass (shared weights) raises :class:`~influencekit.errors.UnsupportedModuleError`.

    ``expand``: modules whose input may be shared by the batch (first dimension 1, e.g. position
    ids ``[1, T]``): when :attr:`batch_size` is set and larger, their output is returned expanded
    to ``[batch_size, ...]`` (a view; the model's broadcasting gives the same values), so that
    their output gradient keeps one row per example instead of the sum over the batch.

    ``probe``: each module's output is returned as ``output + probe`` with ``probe`` a fresh
    zero scalar leaf that requires grad (``probes[name]``; the values are unchanged). A
    backward pass asked for the probes' gradients reaches every output gradient without
    forming any parameter's gradient (:class:`LayerPass`).
    """

    def __init__(self, modules: dict[str, nn.Module], expand=frozenset(), probe: bool = False):
        self.modules = modules
        self.expand = frozenset(expand)
        self.probe = probe
        self.batch_size: int | None = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.probes: dict[str, torch.Tensor] = {}
        self.output_grads: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> LayerCapture:
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(partial(self._forward, name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self._remove()
        return False

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def reset(self) -> None:
        self.inputs.clear()
        self.output_grads.clear()
        self.probes.clear()

    def _forward(self, name, module, args, output):
        if name in self.inputs:
            raise check_single_use(name)
        x = args[0]
        replaced = self._expanded(name, x, output)
        if replaced is not None:
            x = x.expand(self.batch_size, *x.shape[1:])
            output = replaced
        self.inputs[name] = x.detach()
        if self.probe and isinstance(output, torch.Tensor) and output.is_floating_point():
            probe = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            self.probes[name] = probe
            output = replaced = output + probe
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(self._backward, name))
        return replaced  # None keeps the module's own output

    def _expanded(self, name, x, output) -> torch.Tensor | None:
        """The output expanded to the batch when ``name`` is to be expanded and its input is
        shared by the batch; else None."""
        if (name not in self.expand or not self.batch_size or self.batch_size == 1
                or not isinstance(output, torch.Tensor) or x.dim() == 0 or x.shape[0] != 1
                or output.dim() == 0 or output.shape[0] != 1):
            return None
        return output.expand(self.batch_size, *output.shape[1:])

    def _backward(self, name, grad):
        self.output_grads[name] = grad.detach()


class LayerPass:
    """One hooked forward pass of a Target and its backward passes (use inside ``with``).

    ``params`` given to :meth:`forward` must be leaf tensors that require grad (see
    :func:`live_params`); their gradients are never formed, only the layers' output gradients
    (backward asks for the gradients of zero probes added to the layers' outputs).
    ``expand``: layer names whose batch-shared output is expanded per example
    (:class:`LayerCapture`).
    """

    def __init__(self, target, layers: list[Layer], expand=frozenset()):
        self.target = target
        self.layers = layers
        self.modules = {layer.name: target.model.get_submodule(layer.name) for layer in layers}
        self._capture = LayerCapture(self.modules, expand, probe=True)

    def __enter__(self) -> LayerPass:
        self._capture.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        return self._capture.__exit__(*exc)

    def forward(self, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """The Target's outputs on ``batch`` with every layer's input recorded."""
        self._capture.reset()
        self._capture.batch_size = batch_size(batch)
        return self.target.outputs(params, batch)

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """``{layer name: the module's input}`` of the last forward pass."""
        return self._capture.inputs

    def backward(self, values: torch.Tensor, retain_graph: bool = False
                 ) -> dict[str, torch.Tensor | None]:
        """``{layer name: ∂(Σ values)/∂output}`` (None for layers that do not reach values)."""
        self._capture.output_grads.clear()
        probes = list(self._capture.probes.values())
        if values.requires_grad and probes:
            # the probes' gradients are sums of output gradients: no parameter gradient
            # (a weight-sized product per layer) is formed
            torch.autograd.grad(values.sum(), probes, retain_graph=retain_graph,
                                allow_unused=True)
        grads = self._capture.output_grads
        return {layer.name: grads.get(layer.name) for layer in self.layers}


def live_params(target, dtype, device) -> dict[str, torch.Tensor]:
    """Fresh leaf tensors of the Target's parameters that require grad: detached aliases of the
    parameters' storage (no copy in their dtype; never the user's tensor objects, whose
    ``requires_grad`` is left as it was). Nothing may write into them."""
    return {n: p.detach().requires_grad_(True)
            for n, p in target.params(dtype, device).items()}
