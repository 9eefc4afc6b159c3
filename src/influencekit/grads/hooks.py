"""Layer hooks on ``nn.Linear`` / ``nn.Conv2d``: inputs, output gradients, per-example gradients.

:class:`LayerCapture` is a context manager that registers one forward hook per chosen module and
removes every handle when the block ends, also when it ends with an exception. The forward hook
keeps the module's input and registers a *tensor* hook on the module's output; that tensor hook
receives ∂(backpropagated scalar)/∂output during backward. Tensor hooks live on the autograd
graph, not on the module, and they see the gradient of the output as the module returned it even
when a later in-place operation (``ReLU(inplace=True)``) modifies it. Nothing is replaced,
wrapped or edited: the user's modules keep their identity and, after the block, their hook
dictionaries are as before.

Module hooks fire under ``torch.func.functional_call`` (the way :class:`~influencekit.Target`
calls the model): ``functional_call`` swaps parameters for the call and runs ``model(...)``
through the ordinary ``Module.__call__``, so forward hooks run and the outputs belong to the
graph of the parameters passed in. They do NOT run inside ``vmap``/``grad`` transforms, which is
why the hook path is a separate fast path beside :func:`influencekit.func.per_example_gradients`.

Every layer is seen as tokens: ``a [B, T, width]`` (inputs, with a trailing 1 when the bias is
selected) and ``g [B, T, d_out]`` (output gradients). For ``nn.Linear`` the tokens are all
dimensions between the batch and the features (``[B, d]`` has T = 1, ``[B, T, d]`` has T); for
``nn.Conv2d`` they are the output positions of ``F.unfold``. The per-example gradient of the
layer is then ``G_b = Σ_t g_bt a_btᵀ`` ``[d_out, width]`` (activation × output-gradient).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from ..func.params import ParamSpace
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target
from .data import as_loader, batches
from .stream import _regularizer_gradient, check_finite, compute_dtype

SUPPORTED = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class HookedLayer:
    """One supported module whose parameters the Target selects.

    ``weight`` / ``bias`` are the Target's parameter names (``None`` when not selected).
    ``d_in`` is the number of weight columns (``in_features`` or ``C_in·kh·kw``).
    """

    name: str
    kind: str
    weight: str | None
    bias: str | None
    d_out: int
    d_in: int

    @property
    def width(self) -> int:
        """Columns of the layer's gradient matrix: weight columns (if selected) + 1 for the bias."""
        return (self.d_in if self.weight else 0) + (1 if self.bias else 0)

    def to_dict(self) -> dict:
        return asdict(self)


def find_layers(target: Target, modules: list[str] | None = None) -> list[HookedLayer]:
    """The supported modules holding the Target's parameters, in parameter order.

    Raises :class:`UnsupportedModuleError` naming every selected parameter that is not the weight
    or bias of a supported module (among ``modules`` when given).
    """
    model = target.model
    wanted = None if modules is None else set(modules)
    found: dict[str, dict[str, str]] = {}
    unsupported = []
    for name in target.space.names:
        path, _, leaf = name.rpartition(".")
        module = model.get_submodule(path)
        if (leaf in ("weight", "bias") and _supported(module)
                and (wanted is None or path in wanted)):
            found.setdefault(path, {})[leaf] = name
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        scope = "" if wanted is None else f" among modules={sorted(wanted)}"
        raise UnsupportedModuleError(
            f"these selected parameters are not the weight/bias of an nn.Linear or nn.Conv2d "
            f"(groups=1){scope}: {unsupported}. Layer-wise methods (K-FAC, EK-FAC, hook "
            "gradients) need every parameter in such a module. Either restrict the Target with "
            "Target(params=[...]) to those layers, or combine methods per module with "
            "ik.block_diagonal({...}) (e.g. Exact for the other modules).")
    if wanted is not None and wanted - set(found):
        raise UnsupportedModuleError(
            f"modules {sorted(wanted - set(found))} hold no selected parameter of a supported "
            f"layer; supported modules with selected parameters: {sorted(found)}.")
    return [_describe(path, model.get_submodule(path), names) for path, names in found.items()]


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear)


def _describe(path: str, module: nn.Module, names: dict[str, str]) -> HookedLayer:
    kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
    d_out = module.weight.shape[0]
    d_in = module.weight[0].numel()
    return HookedLayer(path, kind, names.get("weight"), names.get("bias"), d_out, d_in)


def layer_modules(target: Target, layers: list[HookedLayer]) -> dict[str, nn.Module]:
    return {layer.name: target.model.get_submodule(layer.name) for layer in layers}


def layer_index(layer: HookedLayer, space: ParamSpace) -> torch.Tensor:
    """``[d_out, width]`` positions in the flat parameter vector of the layer's gradient matrix.

    Row o holds the weight row o (flattened row-major, as the flat vector stores it) followed by
    bias entry o.
    """
    slices = space.slices()
    cols = []
    if layer.weight:
        start = slices[layer.weight].start
        cols.append(start + torch.arange(layer.d_out * layer.d_in).reshape(layer.d_out,
                                                                             layer.d_in))
    if layer.bias:
        cols.append(slices[layer.bias].start + torch.arange(layer.d_out)[:, None])
    return torch.cat(cols, dim=1)


# -- the context manager ------------------------------------------------------------------------
class LayerCapture:
    """Context manager: record inputs and output gradients of chosen modules.

    ``with LayerCapture({name: module}) as cap:`` registers one forward hook per module and
    removes all of them on exit, whatever happens inside. After a forward pass
    ``cap.inputs[name]`` is the module's (detached) first input; after each backward pass
    ``cap.output_grads[name]`` is the gradient of the backpropagated scalar w.r.t. the module's
    output. Call :meth:`reset` before each forward pass. A module called twice in one forward
    pass (shared weights) raises :class:`UnsupportedModuleError`.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.inputs: dict[str, torch.Tensor] = {}
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

    def _forward(self, name, module, args, output):
        if name in self.inputs:
            raise UnsupportedModuleError(
                f"module {name!r} was called more than once in one forward pass (shared "
                "weights); layer-wise methods need one call per module. Exclude its parameters "
                "from the Target or use a matrix-free inverse (ik.CG, ik.Exact).")
        self.inputs[name] = args[0].detach()
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(self._backward, name))

    def _backward(self, name, grad):
        self.output_grads[name] = grad.detach()


# -- token views ---------------------------------------------------------------------------------
def layer_activations(layer: HookedLayer, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``a [B, T, width]``: the layer's inputs as tokens, with a trailing 1 if the bias is selected."""
    if layer.kind == "conv2d":
        tokens = _unfold(module, x).transpose(1, 2)
    else:
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    parts = [tokens] if layer.weight else []
    if layer.bias:
        parts.append(torch.ones(*tokens.shape[:2], 1, dtype=tokens.dtype, device=tokens.device))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def layer_output_grads(layer: HookedLayer, grad: torch.Tensor) -> torch.Tensor:
    """``g [B, T, d_out]``: output gradients as tokens (same token order as the activations)."""
    if layer.kind == "conv2d":
        return grad.reshape(grad.shape[0], layer.d_out, -1).transpose(1, 2)
    return grad.reshape(grad.shape[0], -1, layer.d_out)


def _unfold(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``[B, C_in·kh·kw, L]`` patches exactly as ``conv`` sees them (any padding mode)."""
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding,
                    stride=conv.stride)


def live_params(target: Target, dtype, device) -> dict[str, torch.Tensor]:
    """Fresh leaf copies of the Target's parameters that require grad (never the user's tensors)."""
    return {n: p.detach().clone().requires_grad_(True)
            for n, p in target.params(dtype, device).items()}


# -- per-example gradients ------------------------------------------------------------------------
class HookGradients:
    """Per-example gradients ``[B, p]`` of a Target from layer hooks (the fast path).

    ``G_b = Σ_t g_bt a_btᵀ`` per layer: equal to :func:`influencekit.func.per_example_gradients`
    (torch.func vmap) up to rounding. Every Target parameter must be the weight or bias of an
    ``nn.Linear`` / ``nn.Conv2d`` (groups = 1) called once per forward pass, and examples must
    not interact inside the model (no batch norm in training mode).

    The returned ``[B, p]`` tensor is an internal buffer reused by the next call with the same
    batch size, dtype and device: copy it if you keep it.
    """

    def __init__(self, target: Target, layers: list[HookedLayer] | None = None):
        self.target = target
        self.layers = find_layers(target) if layers is None else layers
        self.modules = layer_modules(target, self.layers)
        self.indices = {layer.name: layer_index(layer, target.space).reshape(-1)
                        for layer in self.layers}
        self._buffer: torch.Tensor | None = None
        self._layer_buffers: dict[str, torch.Tensor] = {}

    def __call__(self, params: dict[str, torch.Tensor], batch, which: str = "loss"):
        """``(values [B], grads [B, p])`` of the loss (``which="loss"``) or the measurement."""
        target = self.target
        live = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with LayerCapture(self.modules) as cap:
            outputs = target.outputs(live, batch)
            fn = target.task.loss if which == "loss" else target.task.measurement
            values = target._check_shape(fn(outputs, target._targets(batch, outputs)), outputs,
                                         which)
            torch.autograd.grad(values.sum(), list(live.values()), allow_unused=True)
            inputs, grads = dict(cap.inputs), dict(cap.output_grads)
        flat = self._flat_buffer(values.shape[0], values.dtype, values.device)
        for layer in self.layers:
            a = layer_activations(layer, self.modules[layer.name], inputs[layer.name])
            if layer.name in grads:
                g = layer_output_grads(layer, grads[layer.name])
                matrix = torch.bmm(g.transpose(1, 2), a.to(g.dtype),
                                   out=self._layer_buffer(layer, g))
            else:  # the layer's output does not reach the loss
                matrix = self._layer_buffer(layer, a).zero_()
            flat.index_copy_(1, self.indices[layer.name].to(flat.device),
                             matrix.reshape(matrix.shape[0], -1).to(flat.dtype))
        return values.detach(), flat

    def _flat_buffer(self, size, dtype, device) -> torch.Tensor:
        p = self.target.num_params
        b = self._buffer
        if b is None or b.shape != (size, p) or b.dtype != dtype or b.device != device:
            self._buffer = torch.empty(size, p, dtype=dtype, device=device)
        return self._buffer

    def _layer_buffer(self, layer, like) -> torch.Tensor:
        shape = (like.shape[0], layer.d_out, layer.width)
        b = self._layer_buffers.get(layer.name)
        if b is None or b.shape != shape or b.dtype != like.dtype or b.device != like.device:
            b = self._layer_buffers[layer.name] = torch.empty(shape, dtype=like.dtype,
                                                              device=like.device)
        return b


def iter_hook_gradients(target: Target, data, runtime: Runtime | None = None, *,
                        which: str = "loss", copy: bool = True):
    """Like :func:`influencekit.grads.iter_gradients` (same rows, same ∇R convention), by hooks.

    Yields ``(start, grads [B, p])``. With ``copy=False`` the rows are a buffer that the next
    iteration overwrites (consume them before advancing).
    """
    runtime = resolve_runtime(runtime)
    dtype = compute_dtype(target, runtime)
    params = target.params(dtype, runtime.device)
    computer = HookGradients(target)
    reg_grad = _regularizer_gradient(target, params) if which == "loss" else None
    loader = as_loader(data, runtime, "query data" if which == "measurement" else "training data")
    for start, batch, _ in batches(loader, runtime, dtype, desc=f"hook {which} gradients"):
        values, flat = computer(params, batch, which)
        check_finite(values, flat, start, which)
        if reg_grad is not None:
            flat = flat + reg_grad
        elif copy:
            flat = flat.clone()
        yield start, flat


def hook_gradients(target: Target, data, runtime: Runtime | None = None, **kwargs):
    """All rows of :func:`iter_hook_gradients` stacked: ``[n, p]``."""
    return torch.cat([g for _, g in iter_hook_gradients(target, data, runtime, **kwargs)])
