"""Interchangeable (C + λI)⁻¹ approximations with one interface."""

from .base import REGISTRY, InverseCurvature
from .exact import Exact
from .arnoldi import Arnoldi
from .block import BlockDiagonal, block_diagonal
from .cg import CG
from .diagonal import Diagonal
from .identity import Identity
from .lissa import LiSSA
from .kfac import EKFAC, KFAC

__all__ = ["InverseCurvature", "Exact", "REGISTRY"]
__all__ += ["CG", "LiSSA", "Arnoldi", "Diagonal", "Identity", "BlockDiagonal", "block_diagonal"]
__all__ += ["KFAC", "EKFAC"]
