"""Dataset-scale gradients and data handling."""

from .data import as_loader, num_examples
from .stream import gradients, iter_gradients
from .hooks import HookGradients, LayerCapture, hook_gradients, iter_hook_gradients

__all__ = ["as_loader", "num_examples", "gradients", "iter_gradients"]
__all__ += ["HookGradients", "LayerCapture", "hook_gradients", "iter_hook_gradients"]
