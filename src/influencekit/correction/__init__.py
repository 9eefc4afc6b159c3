"""Fix a misprediction: pick influential examples, take a few fine-tuning steps, verify."""

from .fix import (
                  SELECTORS,
                  FixResult,
                  accuracy,
                  fix_prediction,
                  query_gradient,
                  relabel,
                  select,
                  selection_matrix,
                  selection_scores,
)

__all__ = ["fix_prediction", "FixResult", "SELECTORS", "selection_scores", "selection_matrix",
           "select", "query_gradient", "relabel", "accuracy"]
