"""Scores: influence (and later TracIn, TRAK) of training examples on measurements."""

from .influence import Influence

__all__ = ["Influence"]
