"""Fix a wrong prediction with a few fine-tuning steps on the training examples that matter.

Selection (``selector``):

- ``"influence"``: scores s_m = g_qᵀ (C + λI)⁻¹ g_m with g_q = ∇ℓ(query, desired label) (the
  query's loss under the label we want). s_m > 0: up-weighting z_m lowers that loss (helpful);
  the top-k helpful are fine-tuned on, the top-k harmful (most negative s) optionally ascended;
- ``"gradient_similarity"``: s_m = g_qᵀ g_m (no curvature), same budget;
- ``"random"``: k examples drawn uniformly (harmful: another k).

Fine-tuning works on flat parameters of a deep copy of the model, put in ``eval()`` mode (batch
norm statistics frozen, no dropout); the user's model is written only with ``in_place=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import default_collate

from ..diagnostics.common import copy_target
from ..grads.data import as_loader
from ..grads.stream import gradients
from ..inverse.base import InverseCurvature
from ..response.optimize import write_params
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target, _cast_floating

SELECTORS = ("influence", "random", "gradient_similarity")
OPTIMIZERS = ("adam", "sgd", "normalized")


@dataclass
class FixResult:
    """Outcome of :func:`fix_prediction`.

    ``indices``: the k training examples fine-tuned on; ``harmful_indices``: those ascended on
    (empty unless ``ascend_harmful``). Loss changes are of the query's loss under the desired
    label: ``real_loss_change`` = ℓ_q(θ_T) − ℓ_q(θ_0); ``predicted_loss_change`` = the first-order
    forecast made before fine-tuning from the gradient of the selection objective L_S at θ_0:
    −lr·T·g_qᵀ∇L_S for T SGD steps, −lr·T·g_qᵀ sign(∇L_S) for Adam (whose first updates are
    lr·sign), −lr·T·g_qᵀ∇L_S/‖∇L_S‖ for normalised steps; ``linearized_loss_change`` =
    g_qᵀ(θ_T − θ_0).
    ``heldout_accuracy_*`` are fractions in [0, 1] (nan without held-out data).
    ``params``: flat θ_T ``[p]``.
    """

    selector: str
    k: int
    indices: list[int]
    harmful_indices: list[int]
    prediction_before: int
    prediction_after: int
    desired_label: int
    fixed: bool
    steps: int
    query_loss_before: float
    query_loss_after: float
    real_loss_change: float
    predicted_loss_change: float
    linearized_loss_change: float
    heldout_accuracy_before: float
    heldout_accuracy_after: float
    params: torch.Tensor

    @property
    def heldout_accuracy_delta(self) -> float:
        """after − before, a fraction (−0.01 = one point lost)."""
        return self.heldout_accuracy_after - self.heldout_accuracy_before


def _fetch(train, runtime: Runtime, indices: list[int]):
    dataset = as_loader(train, runtime, "training data").dataset
    idx = torch.as_tensor(indices, dtype=torch.long)
    if hasattr(dataset, "tensors"):
        return tuple(t[idx] for t in dataset.tensors)
    return default_collate([dataset[int(i)] for i in idx])


def query_gradient(target: Target, query_x: torch.Tensor, desired_label: int,
                   runtime: Runtime | None = None) -> torch.Tensor:
    """g_q = ∇θ ℓ(query_x, desired_label) at the Target's parameters, ``[p]`` (no regulariser).

    ``query_x`` is ONE example without a batch dimension.
    """
    runtime = resolve_runtime(runtime)
    params = target.params(runtime.dtype, runtime.device)
    batch = _query_batch(query_x, desired_label, params, runtime)
    grads = torch.func.grad(lambda p: target.losses(p, batch).sum())(params)
    return target.space.flatten(grads)


def _query_batch(query_x, label, params, runtime):
    some = next(iter(params.values()))
    x = _cast_floating(query_x.unsqueeze(0), some.dtype, runtime.device)
    return (x, torch.tensor([int(label)], device=runtime.device))


def selection_scores(target: Target, inverse: InverseCurvature | None, train, query_x,
                     desired_label: int, selector: str, runtime: Runtime | None = None,
                     train_gradients: torch.Tensor | None = None) -> torch.Tensor | None:
    """Scores ``[n_train]`` that rank training examples (larger = more helpful for the desired
    label); None for ``"random"``. ``train_gradients [n, p]`` (g_m, as ``Influence`` computes
    them) may be passed to avoid recomputing them for every query."""
    if selector not in SELECTORS:
        raise ValueError(f"selector={selector!r} is not one of {SELECTORS}")
    if selector == "random":
        return None
    runtime = resolve_runtime(runtime)
    g_q = query_gradient(target, query_x, desired_label, runtime)
    if train_gradients is None:
        train_gradients = gradients(target, train, runtime, which="loss")
    if selector == "influence":
        if inverse is None:
            raise ValueError("selector='influence' needs a fitted inverse")
        direction = inverse.solve(g_q.to(torch.float64))
    else:
        direction = g_q
    return train_gradients.to(direction.dtype) @ direction


def select(scores: torch.Tensor | None, n: int, k: int, seed: int = 0) -> tuple[list[int],
                                                                                list[int]]:
    """(top-k helpful, top-k harmful) indices; random disjoint draws when ``scores`` is None."""
    k = min(k, n)
    if scores is None:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return perm[:k].tolist(), perm[k:2 * k].tolist()
    order = torch.argsort(scores, descending=True)
    return order[:k].tolist(), order.flip(0)[:k].tolist()


def accuracy(target: Target, params: dict[str, torch.Tensor], data,
             runtime: Runtime) -> float:
    """Fraction of ``data`` (a classification data set) whose argmax output equals the label."""
    loader = as_loader(data, runtime, "held-out data")
    right, total = 0, 0
    some = next(iter(params.values()))
    with torch.no_grad():
        for batch in loader:
            batch = _cast_floating(batch, some.dtype, runtime.device)
            pred = target.outputs(params, batch).argmax(dim=-1)
            right += int((pred == target.task.targets(batch)).sum())
            total += pred.shape[0]
    return right / total


def fix_prediction(target: Target, inverse: InverseCurvature | None, train, query_x,
                   desired_label: int, *, k: int = 16, steps: int = 10, lr: float = 0.02,
                   heldout=None, selector: str = "influence", ascend_harmful: bool = False,
                   harmful_weight: float = 1.0, optimizer: str = "adam", seed: int = 0,
                   runtime: Runtime | None = None, train_gradients: torch.Tensor | None = None,
                   in_place: bool = False) -> FixResult:
    """Fine-tune on the k examples that most help ``desired_label`` for ``query_x``.

    Each step minimises ``mean_{m∈S} ℓ_m − harmful_weight · mean_{m∈H} ℓ_m + R`` over the
    Target's parameters (H empty unless ``ascend_harmful``) with ``optimizer``: ``"adam"``,
    ``"sgd"`` or ``"normalized"`` (steps of length exactly ``lr``: θ ← θ − lr·∇/‖∇‖, which
    bounds how far each step moves the model, hence the collateral damage);
    training stops as soon as the query's argmax equals ``desired_label`` or after ``steps``.
    ``query_x``: one example without batch dimension. ``heldout``: optional (x, y) data for the
    collateral damage. See :class:`FixResult` for the returned numbers.
    """
    runtime = resolve_runtime(runtime)
    work = copy_target(target)
    work.model.eval()
    n = len(as_loader(train, runtime, "training data").dataset)
    scores = selection_scores(work, inverse, train, query_x, desired_label, selector, runtime,
                              train_gradients)
    helpful, harmful = select(scores, n, k, seed)
    if not ascend_harmful:
        harmful = []
    dtype = next(iter(work.params().values())).dtype if runtime.dtype is None else runtime.dtype
    theta0 = work.flat_params(dtype, runtime.device)
    theta = theta0.clone().requires_grad_(True)
    batch_s = _cast_floating(_fetch(train, runtime, helpful), dtype, runtime.device)
    batch_h = (_cast_floating(_fetch(train, runtime, harmful), dtype, runtime.device)
               if harmful else None)
    q_batch = _query_batch(query_x, desired_label, work.params(dtype, runtime.device), runtime)

    def selection_objective(flat):
        params = work.space.unflatten(flat)
        value = work.losses(params, batch_s).mean() + work.regularization(params)
        if batch_h is not None:
            value = value - harmful_weight * work.losses(params, batch_h).mean()
        return value

    def query_state(flat):
        with torch.no_grad():
            params = work.space.unflatten(flat)
            out = work.outputs(params, q_batch)
            return int(out.argmax(-1)[0]), float(work.losses(params, q_batch)[0])

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}")
    opt = (torch.optim.Adam([theta], lr=lr) if optimizer == "adam"
           else torch.optim.SGD([theta], lr=lr))
    before, loss_before = query_state(theta.detach())
    g_sel = torch.func.grad(selection_objective)(theta0)
    if optimizer == "adam":
        g_sel = g_sel.sign()
    elif optimizer == "normalized":
        g_sel = g_sel / g_sel.norm().clamp_min(1e-300)
    g_q = torch.func.grad(lambda f: work.losses(work.space.unflatten(f), q_batch).sum())(theta0)
    used, now = 0, before
    while now != desired_label and used < steps:
        opt.zero_grad()
        selection_objective(theta).backward()
        if optimizer == "normalized":
            theta.grad /= theta.grad.norm().clamp_min(1e-300)
        opt.step()
        used += 1
        now, _ = query_state(theta.detach())
    final = theta.detach()
    _, loss_after = query_state(final)
    acc_before = acc_after = float("nan")
    if heldout is not None:
        acc_before = accuracy(work, work.space.unflatten(theta0), heldout, runtime)
        acc_after = accuracy(work, work.space.unflatten(final), heldout, runtime)
    if in_place:
        write_params(target, final)
    return FixResult(selector, len(helpful), helpful, harmful, before, now, int(desired_label),
                     now == desired_label, used, loss_before, loss_after,
                     loss_after - loss_before, float(-lr * used * (g_q @ g_sel)),
                     float(g_q @ (final - theta0)), acc_before, acc_after, final)
