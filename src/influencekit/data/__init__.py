"""Loaders for the offline data sets (see ``shared/DATA.md``); nothing is downloaded."""

from .datasets import DataSplit, digits, fashion_mnist, fashion_mnist_available, read_idx

__all__ = ["DataSplit", "digits", "fashion_mnist", "fashion_mnist_available", "read_idx"]
