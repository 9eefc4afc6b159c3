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

from ..diagnostics.common import copy_target
from ..grads import as_loader, cast_batch, collate, gradients, iter_batches, num_examples
from ..inverse.base import InverseCurvature
from ..response import check_optimizer, write_params
from ..response import train as run_training
from ..runtime import Runtime, resolve_runtime
from ..task.target import Target

SELECTORS = ("influence", "random", "gradient_similarity")


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


def query_gradient(target: Target, query_x: torch.Tensor, desired_label: int,
                   runtime: Runtime | None = None) -> torch.Tensor:
    """g_q = ∇θ ℓ(query_x, desired_label) at the Target's parameters, ``[p]`` (no regulariser).

    ``query_x`` is ONE example without a batch dimension.
    """
    runtime = resolve_runtime(runtime)
    return gradients(target, query_batch(query_x, desired_label), runtime, of="loss",
                     include_regularizer=False)[0]


def query_batch(query_x, label: int):
    """The query as a batch of one ``(x [1, ...], y [1])`` (dict inputs: each tensor gains a
    batch dimension and the label goes under ``"labels"``)."""
    y = torch.tensor([int(label)])
    if isinstance(query_x, dict):
        return {**{k: v.unsqueeze(0) for k, v in query_x.items()}, "labels": y}
    return (query_x.unsqueeze(0), y)


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
        train_gradients = gradients(target, train, runtime, of="loss")
    if selector == "influence":
        if inverse is None:
            raise ValueError("selector='influence' needs a fitted inverse")
        direction = inverse.solve(g_q.to(torch.float64), runtime)
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
        for _, batch, _ in iter_batches(loader, runtime, some.dtype,
                                        check=target.batch_validator()):
            outputs = target.outputs(params, batch)
            pred = outputs.argmax(dim=-1)
            right += int((pred == target.targets(batch, outputs)).sum())
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
    check_optimizer(optimizer)
    work = copy_target(target)
    work.model.eval()
    n = num_examples(as_loader(train, runtime, "training data"))
    scores = selection_scores(work, inverse, train, query_x, desired_label, selector, runtime,
                              train_gradients)
    helpful, harmful = select(scores, n, k, seed)
    if not ascend_harmful:
        harmful = []
    dtype = next(iter(work.params().values())).dtype if runtime.dtype is None else runtime.dtype
    theta0 = work.flat_params(dtype, runtime.device)
    batch_s = cast_batch(collate(train, helpful, runtime), dtype, runtime.device)
    batch_h = (cast_batch(collate(train, harmful, runtime), dtype, runtime.device)
               if harmful else None)
    q_batch = cast_batch(query_batch(query_x, desired_label), dtype, runtime.device)

    def selection_objective(flat, batch=batch_s, w=None):
        params = work.space.unflatten(flat)
        value = work.losses(params, batch).mean() + work.regularization(params)
        if batch_h is not None:
            value = value - harmful_weight * work.losses(params, batch_h).mean()
        return value

    def query_state(flat):
        with torch.no_grad():
            params = work.space.unflatten(flat)
            out = work.outputs(params, q_batch)
            return int(out.argmax(-1)[0]), float(work.loss_from_outputs(out, q_batch)[0])

    before, loss_before = query_state(theta0)
    g_sel = torch.func.grad(selection_objective)(theta0)
    if optimizer == "adam":
        g_sel = g_sel.sign()
    elif optimizer == "normalized":
        g_sel = g_sel / g_sel.norm().clamp_min(1e-300)
    g_q = torch.func.grad(lambda f: work.losses(work.space.unflatten(f), q_batch).sum())(theta0)
    final, used = theta0, 0
    if before != desired_label and steps > 0:
        result = run_training(work, batch_s, [torch.arange(len(helpful))] * steps,
                       objective=selection_objective, optimizer=optimizer, lr=lr, init=theta0,
                       dtype=dtype, stop=lambda flat: query_state(flat)[0] == desired_label,
                       runtime=runtime.replace(progress=False), desc="fine-tuning")
        final, used = result.params, result.steps
    now, loss_after = query_state(final)
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
