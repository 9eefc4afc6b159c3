"""Loaders for the offline data sets (see ``shared/DATA.md``); nothing is downloaded."""

from .bible import CharTokenizer, Verse, kjv_available, kjv_text, kjv_verses
from .datasets import (
                       DataSplit,
                       Split,
                       digits,
                       fashion_mnist,
                       fashion_mnist_available,
                       load_digits_split,
                       read_idx,
)
from .pretrained import (
                       load_minilm_classifier,
                       load_smollm2,
                       minilm_available,
                       minilm_folder,
                       smollm2_available,
                       smollm2_folder,
                       smollm2_tokenizer,
)
from .tweets import load_tweet_sentiment

__all__ = ["DataSplit", "digits", "fashion_mnist", "fashion_mnist_available", "read_idx",
           "Split", "load_digits_split", "load_tweet_sentiment", "CharTokenizer", "Verse",
           "kjv_available", "kjv_text", "kjv_verses", "load_minilm_classifier", "load_smollm2",
           "minilm_available", "minilm_folder", "smollm2_available", "smollm2_folder",
           "smollm2_tokenizer"]
