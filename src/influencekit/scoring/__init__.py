"""Scores: influence (and TracIn, TRAK) of training examples on measurements; streaming top-k
and score stores for runs whose ``[n_query, n_train]`` matrix does not fit in memory."""

from .batching import query_rank_correlation
from .candidates import candidate_recall, candidate_scores, tfidf_candidates, top_k_indices
from .factored import PreparedQueries, TokenScores
from .influence import Influence
from .projected import (
    ProjectedCurvature,
    ProjectedEKFAC,
    ProjectedInfluence,
    build_gradient_store,
    iter_projected_gradients,
)
from .streaming import StreamedScores, score_block, store_top_k, stream_scores
from .topk import RunningTopK, TopKScores
from .tracin import TracIn
from .trak import TRAK

__all__ = ["Influence", "TracIn", "TRAK", "stream_scores", "StreamedScores", "RunningTopK",
           "TopKScores", "store_top_k", "score_block", "PreparedQueries", "TokenScores",
           "query_rank_correlation", "ProjectedCurvature", "ProjectedEKFAC",
           "ProjectedInfluence", "build_gradient_store", "iter_projected_gradients",
           "tfidf_candidates", "candidate_scores", "candidate_recall", "top_k_indices"]
