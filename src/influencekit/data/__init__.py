"""Loaders for offline data sets (see shared/DATA.md) and toy problems."""

from .digits import Split, load_digits_split
from .tweets import load_tweet_sentiment

__all__ = ["Split", "load_digits_split", "load_tweet_sentiment"]
