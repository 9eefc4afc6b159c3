"""Layers the hook engine understands, and how their per-example gradients are formed.

Every supported module is seen through its tokens: the module's input and the gradient of its
output, both with a batch and a token dimension.

Kronecker kinds (``linear``, ``conv2d``, ``conv1d``, ``embedding``): the weight's gradient
matrix in the layout ``[d_out, d_in]`` is ``G_b = Σ_t g_bt a_btᵀ`` with activations
``a [B, T, d_in]`` and output gradients ``g [B, T, d_out]``; with the bias selected a trailing
column of ones is appended to ``a`` (width ``d_in + 1``). For ``nn.Linear`` the tokens are all
dimensions between the batch and the features; for ``nn.Conv2d`` the output positions of
``F.unfold``; GPT-2's ``Conv1D`` stores its weight transposed (``[d_in, d_out]``); an
``nn.Embedding`` is a linear layer on one-hot inputs (``d_in`` = vocabulary size, never formed
densely).

Diagonal kinds (``layernorm``, ``rmsnorm``): elementwise affine ``y = x̂ ⊙ w + b``, whose
per-example gradients are ``Σ_t g_t ⊙ x̂_t`` and ``Σ_t g_t``.

A parameter may belong to several layers (tied input/output embeddings): its per-example
gradient is the sum of the layers' contributions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from ..func.params import ParamSpace

KRONECKER_KINDS = ("linear", "conv2d", "conv1d", "embedding")
DIAGONAL_KINDS = ("layernorm", "rmsnorm")


@dataclass(frozen=True)
class Layer:
    """One supported module holding some of the Target's parameters.

    ``weight`` / ``bias`` are the Target's parameter names (``None`` when not selected).
    Kronecker kinds: ``d_out`` rows and ``d_in`` weight columns of the gradient matrix.
    Diagonal kinds: ``d_out = d_in`` = the number of normalised features.
    """

    name: str
    kind: str
    weight: str | None
    bias: str | None
    d_out: int
    d_in: int

    @property
    def kronecker(self) -> bool:
        return self.kind in KRONECKER_KINDS

    @property
    def width(self) -> int:
        """Columns of the gradient matrix: weight columns (if selected) + 1 for the bias."""
        return (self.d_in if self.weight else 0) + (1 if self.bias else 0)

    @property
    def transposed(self) -> bool:
        """Whether the weight is stored ``[d_in, d_out]`` (GPT-2 Conv1D, Embedding)."""
        return self.kind in ("conv1d", "embedding")

    def to_dict(self) -> dict:
        return asdict(self)


def module_kind(module: nn.Module) -> str | None:
    """The layer kind of a module, or None when the hook engine does not support it."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d" if module.groups == 1 else None
    if isinstance(module, nn.Embedding):
        return "embedding" if module.max_norm is None else None
    if isinstance(module, nn.LayerNorm):
        return "layernorm" if module.elementwise_affine else None
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        return "rmsnorm" if module.elementwise_affine else None
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2
        return "conv1d"
    return None


def _describe(path: str, module: nn.Module, kind: str, names: dict[str, str]) -> Layer:
    weight = module.weight
    if kind in DIAGONAL_KINDS:
        d_out = d_in = weight.numel()
    elif kind in ("conv1d", "embedding"):
        d_in, d_out = weight.shape
    else:
        d_out, d_in = weight.shape[0], weight[0].numel()
    return Layer(path, kind, names.get("weight"), names.get("bias"), d_out, d_in)


def parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """``{id(parameter): [(module path, attribute), ...]}`` over every module that holds it
    (several for tied weights)."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for leaf, param in module.named_parameters(recurse=False):
            pair = (path, leaf)
            entry = owners.setdefault(id(param), [])
            if pair not in entry:
                entry.append(pair)
    return owners


def first_tied_parameter(layers: list[Layer]) -> tuple[str, str, str] | None:
    """``(parameter, first module, second module)`` of the first parameter held by two of
    ``layers`` (tied weights, e.g. GPT-2's input and output embeddings), or None."""
    seen: dict[str, str] = {}
    for layer in layers:
        for name in (layer.weight, layer.bias):
            if name and name in seen:
                return name, seen[name], layer.name
            if name:
                seen[name] = layer.name
    return None


def split_layers(model: nn.Module, names: tuple[str, ...],
                 modules: list[str] | None = None) -> tuple[list[Layer], list[str]]:
    """``(layers, rest)``: the supported layers holding the named parameters (restricted to
    ``modules`` when given) and the names of the parameters no supported layer holds.

    A parameter counts as covered only if EVERY module holding it is supported (a tied weight
    used by an unsupported module needs the other engines).
    """
    named = dict(model.named_parameters())
    owners = parameter_owners(model)
    wanted = None if modules is None else set(modules)
    found: dict[str, dict[str, str]] = {}
    rest = []
    for name in names:
        places = owners.get(id(named[name]), [])
        ok = bool(places) and all(
            leaf in ("weight", "bias") and module_kind(model.get_submodule(path)) is not None
            and (wanted is None or path in wanted) for path, leaf in places)
        if not ok:
            rest.append(name)
            continue
        for path, leaf in places:
            found.setdefault(path, {})[leaf] = name
    layers = []
    for path, leaves in found.items():
        module = model.get_submodule(path)
        layers.append(_describe(path, module, module_kind(module), leaves))
    return layers, rest


def find_layers(target, modules: list[str] | None = None,
                kinds: tuple[str, ...] = KRONECKER_KINDS) -> list[Layer]:
    """The layers of ``kinds`` holding ALL the Target's parameters (among ``modules``).

    Raises :class:`UnsupportedModuleError` naming every selected parameter outside such a layer.
    """
    layers, rest = split_layers(target.model, target.space.names, modules)
    rest += [n for layer in layers if layer.kind not in kinds
             for n in (layer.weight, layer.bias) if n]
    layers = [layer for layer in layers if layer.kind in kinds]
    if rest:
        model = target.model
        described = [f"{n} ({type(model.get_submodule(n.rpartition('.')[0])).__name__})"
                     for n in rest]
        scope = "" if modules is None else f" among modules={sorted(modules)}"
        raise UnsupportedModuleError(
            f"these selected parameters are not the weight/bias of a layer this method "
            f"supports ({', '.join(kinds)}){scope}: {described}. Either restrict the Target "
            "with Target(params=[...]) to those layers, or combine methods per module with "
            "ik.block_diagonal({...}) (e.g. Exact for the other modules).")
    if modules is not None:
        missing = set(modules) - {layer.name for layer in layers}
        if missing:
            raise UnsupportedModuleError(
                f"modules {sorted(missing)} hold no selected parameter of a supported layer; "
                f"supported modules with selected parameters: "
                f"{sorted(layer.name for layer in layers)}.")
    return layers


def layer_index(layer: Layer, space: ParamSpace) -> torch.Tensor:
    """``[d_out, width]`` positions in the flat parameter vector of the layer's gradient matrix.

    Row o holds weight row o (in the ``[d_out, d_in]`` layout) followed by bias entry o.
    """
    slices = space.slices()
    cols = []
    if layer.weight:
        start = slices[layer.weight].start
        grid = torch.arange(layer.d_out * layer.d_in)
        if layer.transposed:
            cols.append(start + grid.reshape(layer.d_in, layer.d_out).T)
        else:
            cols.append(start + grid.reshape(layer.d_out, layer.d_in))
    if layer.bias:
        cols.append(slices[layer.bias].start + torch.arange(layer.d_out)[:, None])
    return torch.cat(cols, dim=1)


# -- token views ---------------------------------------------------------------------------------
def layer_tokens(layer: Layer, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, T, d_in]``: a Kronecker layer's inputs as tokens (unfolded patches for a Conv2d;
    one-hot rows for an Embedding, dense — use only for small vocabularies)."""
    if layer.kind == "conv2d":
        return _unfold(module, x).transpose(1, 2)
    if layer.kind == "embedding":
        ids = x.reshape(x.shape[0], -1)
        one_hot = F.one_hot(ids, layer.d_in).to(torch.get_default_dtype())
        if module.padding_idx is not None:
            one_hot[ids == module.padding_idx] = 0
        return one_hot
    return x.reshape(x.shape[0], -1, x.shape[-1])


def layer_activations(layer: Layer, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``a [B, T, width]``: the inputs as tokens, with a trailing 1 if the bias is selected."""
    tokens = layer_tokens(layer, module, x)
    parts = [tokens] if layer.weight else []
    if layer.bias:
        parts.append(torch.ones(*tokens.shape[:2], 1, dtype=tokens.dtype, device=tokens.device))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def layer_output_grads(layer: Layer, grad: torch.Tensor) -> torch.Tensor:
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


def normalized_inputs(layer: Layer, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x̂ [B, T, d]`` of a LayerNorm / RMSNorm (what its weight multiplies)."""
    shape = tuple(module.normalized_shape)
    if layer.kind == "layernorm":
        xhat = F.layer_norm(x, shape, None, None, module.eps)
    else:
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        xhat = F.rms_norm(x, shape, None, eps)
    return xhat.reshape(x.shape[0], -1, layer.d_in)


# -- per-example gradients -------------------------------------------------------------------------
def per_example_layer_grads(layer: Layer, module: nn.Module, x: torch.Tensor,
                            grad: torch.Tensor | None, shapes: dict[str, tuple[int, ...]],
                            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{parameter name: [B, *shape]}``: this layer's contribution to the per-example gradients
    of its selected parameters, from its input ``x`` and output gradient ``grad`` (None when the
    output does not reach the differentiated value: zeros)."""
    size = x.shape[0]
    out = {n: torch.empty((size, *shapes[n]), dtype=dtype, device=x.device)
           for n in (layer.weight, layer.bias) if n}
    write_layer_grads(layer, module, x, grad, out)
    return out


def write_layer_grads(layer: Layer, module: nn.Module, x: torch.Tensor,
                      grad: torch.Tensor | None, into: dict[str, torch.Tensor],
                      add: frozenset = frozenset()) -> None:
    """Write this layer's per-example gradients into ``into[name]`` (``[B, *shape]``, any
    strides — e.g. column blocks of a flat ``[B, p]`` buffer, written in place with no
    intermediate copy), or add them for the names in ``add`` (tied weights)."""
    size = x.shape[0]
    g = None if grad is None else layer_output_grads(layer, grad)
    if layer.bias:
        dest = into[layer.bias].view(size, layer.d_out)
        if g is None:
            _zero_unless(dest, layer.bias in add)
        elif layer.bias in add:
            dest.add_(g.sum(dim=1))
        else:
            torch.sum(g, dim=1, out=dest)
    if layer.weight:
        _write_weight(layer, module, x, g, into[layer.weight], layer.weight in add)


def _zero_unless(dest: torch.Tensor, keep: bool) -> None:
    if not keep:
        dest.zero_()


def _write_weight(layer: Layer, module: nn.Module, x: torch.Tensor, g: torch.Tensor | None,
                  dest: torch.Tensor, add: bool) -> None:
    size = x.shape[0]
    if g is None:
        _zero_unless(dest, add)
        return
    if layer.kind in DIAGONAL_KINDS:
        value = (g * normalized_inputs(layer, module, x).to(g.dtype)).sum(dim=1)
        dest.view(size, -1).add_(value) if add else dest.view(size, -1).copy_(value)
        return
    if layer.kind == "embedding":
        ids = x.reshape(size, -1)
        if module.padding_idx is not None:
            g = g.masked_fill((ids == module.padding_idx)[..., None], 0)
        table = dest.view(size, layer.d_in, layer.d_out)
        _zero_unless(table, add)
        table.scatter_add_(1, ids[..., None].expand(-1, -1, layer.d_out), g)
        return
    tokens = layer_tokens(layer, module, x).to(g.dtype)
    if layer.kind == "conv1d":  # stored [d_in, d_out]
        left, right, shape = tokens.transpose(1, 2), g, (size, layer.d_in, layer.d_out)
    else:
        left, right, shape = g.transpose(1, 2), tokens, (size, layer.d_out, layer.d_in)
    out = dest.view(shape)
    if add:
        out.baddbmm_(left, right)
    else:
        torch.bmm(left, right, out=out)


class HookIncompatibleError(UnsupportedModuleError):
    """A hooked module cannot give per-example gradients in this model (called more than once
    per forward pass, or fed an input without the batch dimension); ``module`` names it."""

    def __init__(self, message: str, module: str, shared_input: bool = False):
        super().__init__(message)
        self.module = module
        self.shared_input = shared_input


def broadcast_input_error(name: str, got: int, batch: int) -> HookIncompatibleError:
    """The error for a module whose input is shared by the whole batch (e.g. position ids of
    shape ``[1, T]``): its output gradient is already summed over examples."""
    return HookIncompatibleError(
        f"module {name!r} receives an input with first dimension {got} for a batch of {batch} "
        "(an input shared by the whole batch, e.g. position ids [1, T]); its hooked output "
        "gradient is summed over the examples, so per-example gradients need "
        "Runtime(engine='auto'), 'vmap' or 'loop' for its parameters.", name, shared_input=True)


def check_single_use(name: str) -> HookIncompatibleError:
    """The error for a module called twice in one forward pass (shared weights)."""
    return HookIncompatibleError(
        f"module {name!r} was called more than once in one forward pass (shared weights); "
        "layer hooks need one call per module. Use Runtime(engine='vmap') or "
        "Runtime(engine='loop') for per-example gradients, or exclude its parameters from the "
        "Target for layer-wise methods (K-FAC).", name)
