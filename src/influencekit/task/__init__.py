"""Tasks (per-example loss and measurement) and the Target they are computed for."""

from .base import Task
from .classification import ClassificationTask
from .regression import RegressionTask
from .regularizer import L2Regularizer
from .target import Target

__all__ = ["Task", "ClassificationTask", "RegressionTask", "L2Regularizer", "Target"]
