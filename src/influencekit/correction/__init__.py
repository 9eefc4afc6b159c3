"""Fix a misprediction: pick influential examples, take a few fine-tuning steps, verify."""

from .fix import (
                  SELECTORS,
                  FixResult,
                  accuracy,
                  fix_prediction,
                  query_gradient,
                  select,
                  selection_scores,
)

__all__ = ["fix_prediction", "FixResult", "SELECTORS", "selection_scores", "select",
           "query_gradient", "accuracy"]
