"""Interchangeable (C + λI)⁻¹ approximations with one interface."""

from .arnoldi import Arnoldi
from .base import REGISTRY, InverseCurvature
from .block import BlockDiagonal, block_diagonal
from .cg import CG
from .diagonal import Diagonal
from .exact import Exact
from .identity import Identity
from .kfac import EKFAC, KFAC
from .lissa import LiSSA

__all__ = ["InverseCurvature", "Exact", "CG", "LiSSA", "Arnoldi", "KFAC", "EKFAC", "Diagonal",
           "Identity", "BlockDiagonal", "block_diagonal", "REGISTRY"]
