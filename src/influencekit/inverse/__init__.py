"""Interchangeable (C + λI)⁻¹ approximations with one interface."""

from .base import REGISTRY, InverseCurvature
from .exact import Exact
from .kfac import EKFAC, KFAC

__all__ = ["InverseCurvature", "Exact", "REGISTRY"]
__all__ += ["KFAC", "EKFAC"]
