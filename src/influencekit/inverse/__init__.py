"""Interchangeable (C + λI)⁻¹ approximations with one interface."""

from .base import REGISTRY, InverseCurvature
from .exact import Exact

__all__ = ["InverseCurvature", "Exact", "REGISTRY"]
