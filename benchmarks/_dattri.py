"""Shared dattri adapter for the benchmarks (the optional ``bench`` extra): dattri's TRAK on one
checkpoint (the trained model), its target the correct-class margin log(p / (1 − p)).

Sign: dattri's TRAK score predicts the rise of the query's margin when the training example is
included, so positive = helpful, the sign of our ``s`` (whose measurement is the loss); its scale
is TRAK's, not ours (LDS and Pearson are scale-free)."""

from __future__ import annotations

import time

import torch
from torch import nn


def available() -> bool:
    try:
        import dattri  # noqa: F401
    except ImportError:
        return False
    return True


def trak_pairwise(model: nn.Module, train, query, proj_dim: int = 512,
                  regularization: float = 0.0) -> tuple[torch.Tensor, float]:
    """dattri TRAK scores ``[n_query, n_train]`` float64 of ``model`` on tuples of tensors
    (CPU), and the seconds."""
    import copy

    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    model = copy.deepcopy(model)  # dattri loads the checkpoint into the module it is given

    def margin(params, pair):
        x, y = pair
        logits = torch.func.functional_call(model, params, x.unsqueeze(0))
        logp = -nn.functional.cross_entropy(logits, y.unsqueeze(0))
        return logp - torch.log(1 - torch.exp(logp))

    def correct_probability(params, pair):
        x, y = pair
        logits = torch.func.functional_call(model, params, x.unsqueeze(0))
        return torch.exp(-nn.functional.cross_entropy(logits, y.unsqueeze(0)))

    t0 = time.perf_counter()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    task = AttributionTask(loss_func=margin, model=model, checkpoints=state)
    attributor = TRAKAttributor(task=task, correct_probability_func=correct_probability,
                                projector_kwargs={"proj_dim": proj_dim, "device": "cpu"},
                                device="cpu", regularization=regularization)
    attributor.cache(DataLoader(TensorDataset(*train), batch_size=256, shuffle=False))
    scores = attributor.attribute(DataLoader(TensorDataset(*query), batch_size=256,
                                             shuffle=False))
    return scores.T.double().cpu(), time.perf_counter() - t0
