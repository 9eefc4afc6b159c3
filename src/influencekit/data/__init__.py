"""Loaders for offline data sets (see shared/DATA.md) and toy problems."""

from .digits import Split, load_digits_split

__all__ = ["Split", "load_digits_split"]
