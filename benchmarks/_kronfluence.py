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


# ---------------------------------------------------------------------------------------------
# language models (benchmarks/language_models.py)
# ---------------------------------------------------------------------------------------------
def linear_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every GPT-2 ``Conv1D`` (y = x W + b, W ``[in, out]``)
    replaced by the same function as an ``nn.Linear`` (weight Wᵀ), under the same module name.

    kronfluence tracks only ``nn.Linear`` / ``nn.Conv2d``; the copy computes exactly the same
    function, so its scores over the same module names are comparable with ours on the original
    model (which our gradient engine handles as Conv1D). The user's model is never edited."""
    import copy

    clone = copy.deepcopy(model)
    for name, module in list(clone.named_modules()):
        if type(module).__name__ != "Conv1D":
            continue
        weight = module.weight.detach()
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None,
                           dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight.T)
            if module.bias is not None:
                linear.bias.copy_(module.bias.detach())
        parent_name, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent_name) if parent_name else clone, child, linear)
    return clone


def causal_lm_task(modules: list[str]):
    """A kronfluence Task for a Hugging Face causal LM on dict batches (``input_ids``,
    ``attention_mask``): training loss and measurement are the SUM over the batch of each
    sequence's summed next-token cross-entropy (padding ignored) — the curvature of the MEAN
    over sequences, as ours (``ik.CausalLMTask``); for the fit, next tokens are sampled from the
    model (one draw per position). Influence is tracked on ``modules`` only."""
    from kronfluence.task import Task

    class CausalLM(Task):
        def _logits_and_labels(self, batch, model):
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0,
                                                           -100)
            return logits, labels

        def compute_train_loss(self, batch, model, sample=False):
            logits, labels = self._logits_and_labels(batch, model)
            flat = logits.reshape(-1, logits.shape[-1])
            if sample:
                with torch.no_grad():
                    drawn = torch.multinomial(flat.detach().float().softmax(-1), 1).flatten()
                labels = torch.where(labels.reshape(-1) != -100, drawn, -100)
            return nn.functional.cross_entropy(flat, labels.reshape(-1), ignore_index=-100,
                                               reduction="sum")

        def compute_measurement(self, batch, model):
            logits, labels = self._logits_and_labels(batch, model)
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               labels.reshape(-1), ignore_index=-100,
                                               reduction="sum")

        def get_influence_tracked_modules(self):
            return list(modules)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return CausalLM()


def sequence_classification_task(modules: list[str]):
    """A kronfluence Task for a Hugging Face sequence classifier on dict batches (``labels``):
    sum-reduced cross-entropy (labels sampled from the model for the fit), measurement = the
    query's cross-entropy; influence tracked on ``modules``."""
    from kronfluence.task import Task

    class SequenceClassification(Task):
        def _logits(self, batch, model):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            return model(**inputs).logits

        def compute_train_loss(self, batch, model, sample=False):
            logits = self._logits(batch, model)
            labels = batch["labels"]
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(logits.detach().float().softmax(-1), 1).flatten()
            return nn.functional.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return nn.functional.cross_entropy(self._logits(batch, model), batch["labels"],
                                               reduction="sum")

        def get_influence_tracked_modules(self):
            return list(modules)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return SequenceClassification()


def lm_arguments(damping: float, dtype: torch.dtype):
    """(FactorArguments, ScoreArguments) for EK-FAC with every dtype ``dtype`` and an explicit
    damping (kronfluence's default is a heuristic)."""
    from kronfluence.arguments import FactorArguments, ScoreArguments
    factor_args = FactorArguments(
        strategy="ekfac", use_empirical_fisher=False, activation_covariance_dtype=dtype,
        gradient_covariance_dtype=dtype, eigendecomposition_dtype=torch.float64,
        lambda_dtype=dtype, per_sample_gradient_dtype=dtype)
    score_args = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=dtype,
                                precondition_dtype=dtype, score_dtype=dtype)
    return factor_args, score_args


def lm_fit_and_score(model: nn.Module, task, train_set, query_set, damping: float,
                     dtype: torch.dtype, batch_size: int, query_batch_size: int,
                     on_fit_start=None) -> tuple[float, float, torch.Tensor]:
    """kronfluence EK-FAC on a (Linear-only) copy of ``model``: ``(fit seconds, score seconds,
    scores [n_query, n_train])``, sign and scale of our ``s`` with loss-only training
    gradients. ``on_fit_start()`` is called right before fitting (to reset a memory meter)."""
    from kronfluence.analyzer import Analyzer, prepare_model

    logging.getLogger().setLevel(logging.WARNING)
    factor_args, score_args = lm_arguments(damping, dtype)
    prepared = prepare_model(linear_copy(model).to(dtype), task)
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer("lm", prepared, task, cpu=True, disable_tqdm=True,
                            output_dir=folder, log_level=logging.WARNING)
        if on_fit_start is not None:
            on_fit_start()
        t0 = time.perf_counter()
        analyzer.fit_all_factors("ekfac", train_set, per_device_batch_size=batch_size,
                                 factor_args=factor_args, overwrite_output_dir=True)
        t1 = time.perf_counter()
        analyzer.compute_pairwise_scores("scores", "ekfac", query_set, train_set,
                                         per_device_query_batch_size=query_batch_size,
                                         per_device_train_batch_size=batch_size,
                                         score_args=score_args, overwrite_output_dir=True)
        t2 = time.perf_counter()
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return t1 - t0, t2 - t1, scores.double().cpu()
