"""Shared kronfluence adapter for the benchmarks (the optional ``bench`` extra).

Mapping to our conventions (see benchmarks/inverse_methods.py's docstring):
- damping: kronfluence's factors are of the MEAN per-example loss (its task returns the SUM over
  the batch) and know nothing of our L2 regulariser, so pass ``damping_factor = λ + l2``.
- sign and scale: kronfluence's pairwise score is g_qᵀ (C + damping)⁻¹ g_m with no 1/n, the same
  sign and scale as our ``s`` (positive = helpful). Its training gradients are ∇ℓ only (ours are
  ∇ℓ + ∇R): a per-query constant apart.
"""

from __future__ import annotations

import logging
import tempfile
import time

import torch
from torch import nn


def available() -> bool:
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return False
    return True


def sum_cross_entropy_task():
    """A kronfluence Task: sum-reduced cross-entropy (labels sampled from the model when asked);
    the measurement is the query's cross-entropy loss."""
    from kronfluence.task import Task

    class SumCrossEntropy(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(logits.detach().softmax(-1), 1).flatten()
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return nn.functional.cross_entropy(model(x), y, reduction="sum")

    return SumCrossEntropy()


def float64_arguments(strategy: str, damping_factor: float, empirical: bool = False):
    """(FactorArguments, ScoreArguments) with every dtype float64 (our harness is float64)."""
    from kronfluence.arguments import FactorArguments, ScoreArguments
    f64 = torch.float64
    factor_args = FactorArguments(
        strategy=strategy, use_empirical_fisher=empirical, activation_covariance_dtype=f64,
        gradient_covariance_dtype=f64, eigendecomposition_dtype=f64, lambda_dtype=f64,
        per_sample_gradient_dtype=f64)
    score_args = ScoreArguments(damping_factor=damping_factor, per_sample_gradient_dtype=f64,
                                precondition_dtype=f64, score_dtype=f64)
    return factor_args, score_args


class Session:
    """One kronfluence Analyzer on a prepared model in a temporary folder (use as a context)."""

    def __init__(self, model: nn.Module, device: str = "cpu", batch_size: int = 256):
        self.model, self.device, self.batch_size = model, device, batch_size

    def __enter__(self):
        from kronfluence.analyzer import Analyzer, prepare_model
        logging.getLogger().setLevel(logging.WARNING)
        task = sum_cross_entropy_task()
        self._dir = tempfile.TemporaryDirectory()
        model = prepare_model(self.model.to(self.device), task)
        self.analyzer = Analyzer("bench", model, task, cpu=not self.device.startswith("cuda"),
                                 disable_tqdm=True, output_dir=self._dir.name,
                                 log_level=logging.WARNING)
        return self

    def __exit__(self, *exc):
        self._dir.cleanup()

    def fit_and_score(self, name, train_set, query_set, n_query, factor_args, score_args):
        """(fit seconds, score seconds, scores [n_query, n_train] tensor)."""
        t0 = time.perf_counter()
        self.analyzer.fit_all_factors(name, train_set, per_device_batch_size=self.batch_size,
                                      factor_args=factor_args, overwrite_output_dir=True)
        t1 = time.perf_counter()
        self.analyzer.compute_pairwise_scores(
            name, name, query_set, train_set, per_device_query_batch_size=n_query,
            per_device_train_batch_size=self.batch_size, score_args=score_args,
            overwrite_output_dir=True)
        scores = self.analyzer.load_pairwise_scores(name)["all_modules"]
        return t1 - t0, time.perf_counter() - t1, scores


def pairwise(model: nn.Module, train, query, strategy: str, damping_factor: float, *,
             empirical: bool = False, device: str = "cpu") -> tuple[torch.Tensor, float]:
    """kronfluence's pairwise scores ``[n_query, n_train]`` float64 (our ``s`` sign and scale,
    loss-only training gradients) of a float64 ``model`` on tuples of tensors, and the seconds.

    ``model`` is copied first: kronfluence's ``prepare_model`` wraps its modules in place, and our
    benchmarks must never edit the user's modules."""
    import copy

    from torch.utils.data import TensorDataset
    factor_args, score_args = float64_arguments(strategy, damping_factor, empirical)
    t0 = time.perf_counter()
    with Session(copy.deepcopy(model), device) as session:
        _, _, scores = session.fit_and_score("full", TensorDataset(*train), TensorDataset(*query),
                                             len(query[0]), factor_args, score_args)
    return scores.double().cpu(), time.perf_counter() - t0
