"""Dataset-scale gradients and the data layer (the only code that touches batches).

- data layer: :func:`as_loader`, :func:`as_dataset`, :func:`num_examples`, :func:`batch_size`,
  :func:`cast_batch`, :func:`take`, :func:`collate`, :func:`check_weights`,
  :func:`iter_batches`, :class:`DictDataset`, :func:`check_loader_order`,
  :func:`check_example_dimension`, :func:`batch_rows`;
- the gradient engine (hooks / vmap / loop): :class:`GradientEngine`, :func:`iter_gradients`,
  :func:`gradients` (split over the processes of ``Runtime.context``), :func:`sharded`;
- layers and hooks: :class:`Layer`, :func:`find_layers`, :func:`split_layers`,
  :class:`LayerCapture`, :class:`LayerPass`; a layer's parameters as one gradient matrix
  (:func:`layer_matrix`, :func:`layer_parameters`);
- random projections: :class:`RandomProjection` (flat), :class:`LayerProjection` (per layer,
  per side).
"""

from .capture import LayerCapture, LayerPass, live_params
from .data import (
    DictDataset,
    as_dataset,
    as_loader,
    batch_rows,
    batch_size,
    cast_batch,
    check_example_dimension,
    check_loader_order,
    check_weights,
    collate,
    iter_batches,
    num_examples,
    take,
)
from .engine import ENGINES, GradientEngine
from .layers import (
    DIAGONAL_KINDS,
    KRONECKER_KINDS,
    HookIncompatibleError,
    Layer,
    broadcast_input_error,
    find_layers,
    first_tied_parameter,
    layer_activations,
    layer_index,
    layer_output_grads,
    layer_tokens,
    module_kind,
    normalized_inputs,
    per_example_layer_grads,
    split_layers,
    write_layer_grads,
)
from .matrices import layer_matrix, layer_parameters
from .projection import LayerProjection, RandomProjection
from .stream import (
    check_finite,
    compute_dtype,
    gradients,
    iter_gradients,
    iter_values_and_gradients,
    regularizer_gradient,
    sharded,
)

__all__ = [
    "DictDataset", "as_dataset", "as_loader", "batch_size", "cast_batch", "check_weights",
    "collate", "iter_batches", "num_examples", "take", "check_loader_order",
    "check_example_dimension", "batch_rows",
    "ENGINES", "GradientEngine", "iter_gradients", "iter_values_and_gradients", "gradients",
    "sharded",
    "compute_dtype",
    "regularizer_gradient", "check_finite",
    "Layer", "HookIncompatibleError", "broadcast_input_error", "KRONECKER_KINDS",
    "DIAGONAL_KINDS", "find_layers",
    "split_layers", "first_tied_parameter", "module_kind",
    "layer_index", "layer_tokens", "layer_activations", "layer_output_grads",
    "normalized_inputs", "per_example_layer_grads", "write_layer_grads", "layer_matrix",
    "layer_parameters",
    "LayerCapture", "LayerPass", "live_params",
    "RandomProjection", "LayerProjection",
]
