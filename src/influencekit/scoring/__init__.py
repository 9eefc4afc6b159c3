"""Scores: influence (and later TracIn, TRAK) of training examples on measurements."""

from .influence import Influence
from .tracin import TracIn
from .trak import TRAK

__all__ = ["Influence", "TracIn", "TRAK"]
