"""Loaders for the offline data sets (see ``shared/DATA.md``); nothing is downloaded."""

from .datasets import (
                       DataSplit,
                       Split,
                       digits,
                       fashion_mnist,
                       fashion_mnist_available,
                       load_digits_split,
                       read_idx,
)
from .tweets import load_tweet_sentiment

__all__ = ["DataSplit", "digits", "fashion_mnist", "fashion_mnist_available", "read_idx",
           "Split", "load_digits_split", "load_tweet_sentiment"]
