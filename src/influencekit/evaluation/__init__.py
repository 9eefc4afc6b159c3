"""Metrics against real retraining: LDS, LOO correlation, removal curves, mislabel detection,
and the decomposition of the gap between influence and retraining."""

from .decomposition import gap_decomposition
from .metrics import (
                      CorrelationResult,
                      auc,
                      flip_labels,
                      lds,
                      loo_correlation,
                      mislabel_detection,
                      pearson,
                      sample_subsets,
                      spearman,
)
from .removal import removal_curve

__all__ = ["CorrelationResult", "auc", "flip_labels", "lds", "loo_correlation",
           "mislabel_detection", "sample_subsets", "pearson", "spearman", "removal_curve",
           "gap_decomposition"]
