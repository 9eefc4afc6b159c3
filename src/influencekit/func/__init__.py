"""Pure tensor functions: parameter spaces, per-example gradients, curvature products."""

from .grads import per_example_gradients, per_example_gradients_loop
from .params import ParamSpace

__all__ = ["ParamSpace", "per_example_gradients", "per_example_gradients_loop"]
