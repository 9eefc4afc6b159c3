"""What is inverted: the curvature of the training objective."""

from .curvature import KINDS, Curvature

__all__ = ["Curvature", "KINDS"]
