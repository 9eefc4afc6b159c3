"""Tasks (how the model is called and what its outputs mean) and the Target they serve."""

from .base import Task, output_tensor
from .classification import ClassificationTask, log_odds
from .huggingface import CausalLMTask, SequenceClassificationTask
from .regression import RegressionTask
from .regularizer import L2Regularizer
from .target import Target

__all__ = ["Task", "ClassificationTask", "RegressionTask", "SequenceClassificationTask",
           "CausalLMTask", "L2Regularizer", "Target", "output_tensor", "log_odds"]
