"""TF-IDF candidate filtering: the candidates, their exact scores and the recall report, each
against an independent computation (sklearn's cosine, the unfiltered scores, a plain loop)."""

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.errors import InfluenceKitError
from influencekit.scoring import (
    candidate_recall,
    candidate_scores,
    tfidf_candidates,
    top_k_indices,
)

from .transformer_models import padded, random_sequences, tiny_gpt2

DAMPING = 1e-2


def _text(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def planted():
    """Random training sequences with a near-duplicate of query 0 (one token changed) planted
    at index 11, and the influence of every training sequence on every query."""
    query_ids = [[3, 5, 7, 9, 2, 4, 6, 8], [1, 10, 1, 10, 3, 3]]
    train_ids = random_sequences(20, seed=4, low=5, high=9)
    near = list(query_ids[0])
    near[4] = 10
    train_ids[11] = near
    target = ik.Target(tiny_gpt2(), ik.CausalLMTask(),
                       params=["transformer.h.1.attn", "transformer.h.1.mlp"])
    train, query = padded(train_ids), padded(query_ids)
    inverse = ik.EKFAC(DAMPING).fit(ik.Curvature(target, train))
    scorer = ik.Influence(target, inverse)
    return ([_text(s) for s in query_ids], [_text(s) for s in train_ids], scorer, query, train,
            scorer.pairwise(query, train))


def test_tfidf_finds_the_planted_near_duplicate(planted):
    query_texts, train_texts, scorer, query, train, scores = planted
    candidates = tfidf_candidates(query_texts, train_texts, m=5)
    assert candidates.shape == (2, 5) and candidates.dtype == torch.long
    assert int(candidates[0, 0]) == 11
    # the ranking is sklearn's cosine similarity of TF-IDF vectors, by hand
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectors = TfidfVectorizer().fit(train_texts)
    t, q = vectors.transform(train_texts).toarray(), vectors.transform(query_texts).toarray()
    cosine = q @ t.T / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(t, axis=1)[None]
    for row in range(2):
        expected = sorted(range(20), key=lambda j: (-round(cosine[row, j], 12), j))[:5]
        assert candidates[row].tolist() == expected
    # exact scoring of the candidates: the unfiltered scores at those indices
    filtered = candidate_scores(scorer, query, train, candidates)
    torch.testing.assert_close(filtered, torch.gather(scores, 1, candidates), rtol=1e-10,
                               atol=1e-12)
    # and the near-duplicate is the most helpful training sequence for its query
    assert int(top_k_indices(scores, 1)[0, 0]) == 11
    assert int(candidates[0, int(filtered[0].argmax())]) == 11


def test_candidate_recall_is_the_share_of_the_top_k_found(planted):
    query_texts, train_texts, _, _, _, scores = planted
    candidates = tfidf_candidates(query_texts, train_texts, m=20)
    got = candidate_recall(scores, candidates, k=4, ms=[1, 5, 20])
    for m, value in got.items():
        found = []
        for q in range(2):
            order = sorted(range(20), key=lambda j: (-float(scores[q, j]), j))[:4]
            found.append(len(set(order) & set(candidates[q, :m].tolist())) / 4)
        assert value == pytest.approx(sum(found) / 2)
    assert got[20] == 1.0                                       # every text is a candidate
    harmful = candidate_recall(scores, candidates, k=2, ms=[20], by="harmful")
    assert harmful == {20: 1.0}
    with pytest.raises(InfluenceKitError, match="outside"):
        candidate_recall(scores, candidates[:, :3], k=2, ms=[5])
    with pytest.raises(InfluenceKitError, match="m must be"):
        tfidf_candidates(query_texts, train_texts, m=21)
