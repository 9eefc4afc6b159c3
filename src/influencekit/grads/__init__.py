"""Dataset-scale gradients and the data layer (the only code that touches batches).

- data layer: :func:`as_loader`, :func:`as_dataset`, :func:`num_examples`, :func:`batch_size`,
  :func:`cast_batch`, :func:`take`, :func:`collate`, :func:`check_weights`,
  :func:`iter_batches`, :class:`DictDataset`;
- the gradient engine (hooks / vmap / loop): :class:`GradientEngine`, :func:`iter_gradients`,
  :func:`gradients` (split over the processes of ``Runtime.context``), :func:`sharded`;
- layers and hooks: :class:`Layer`, :func:`find_layers`, :func:`split_layers`,
  :class:`LayerCapture`, :class:`LayerPass`;
- random projections: :class:`RandomProjection`.
"""

from .capture import LayerCapture, LayerPass, backward_leaves, live_params
from .data import (
    DictDataset,
    as_dataset,
    as_loader,
    batch_size,
    cast_batch,
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
    find_layers,
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
from .projection import RandomProjection
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
    "collate", "iter_batches", "num_examples", "take",
    "ENGINES", "GradientEngine", "iter_gradients", "iter_values_and_gradients", "gradients",
    "sharded",
    "compute_dtype",
    "regularizer_gradient", "check_finite",
    "Layer", "HookIncompatibleError", "KRONECKER_KINDS", "DIAGONAL_KINDS", "find_layers",
    "split_layers", "module_kind",
    "layer_index", "layer_tokens", "layer_activations", "layer_output_grads",
    "normalized_inputs", "per_example_layer_grads", "write_layer_grads",
    "LayerCapture", "LayerPass", "backward_leaves", "live_params",
    "RandomProjection",
]
