"""Fix a wrong prediction with a few fine-tuning steps on the training examples that matter.

Selection (``selector``):

- ``"influence"``: scores s_m = g_qᵀ (C + λI)⁻¹ g_m with g_q = ∇ℓ(query, desired label) (the
  query's loss under the label we want). s_m > 0: up-weighting z_m lowers that loss (helpful);
  the top-k helpful are fine-tuned on, the top-k harmful (most negative s) optionally ascended;
- ``"gradient_similarity"``: s_m = g_qᵀ g_m (no curvature), same budget;
- ``"random"``: k examples drawn uniformly (harmful: another k).

Fine-tuning works on flat parameters of a deep copy of the model, put in ``eval()`` mode (batch
norm statistics frozen, no dropout); the user's model is written only with ``in_place=True``.
The fine-tuned parameters may differ from those of the influence (``params=``).

Many mispredictions: :func:`selection_matrix` scores all of them in one pass over the training
data (``[n_query, n_train]``, no ``[n_train, p]`` gradient matrix); each row goes to
``fix_prediction(..., scores=row, heldout_before=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diagnostics.common import copy_target
from ..errors import InfluenceKitError
from ..grads import (
    as_loader,
    cast_batch,
    collate,
    gradients,
    iter_batches,
    iter_gradients,
    num_examples,
)
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


def query_gradient(target: Target, query_x, desired_label: int,
                   runtime: Runtime | None = None) -> torch.Tensor:
    """g_q = ∇θ ℓ(query_x, desired_label) at the Target's parameters, ``[p]`` (no regulariser).

    ``query_x`` is ONE example without a batch dimension (a tensor, or a dict of tensors for
    models called with keyword arguments).
    """
    runtime = resolve_runtime(runtime)
    return gradients(target, query_batch(query_x, desired_label, target), runtime, of="loss",
                     include_regularizer=False)[0]


def label_key(target: Target) -> str:
    """The batch key of the labels in dict batches (the Task's ``label_key``, else
    ``"labels"``)."""
    return getattr(target.task, "label_key", "labels")


def query_batch(query_x, label: int, target: Target | None = None):
    """The query as a batch of one ``(x [1, ...], y [1])`` (dict inputs: each tensor gains a
    batch dimension and the label goes under the Task's label key, default ``"labels"``)."""
    y = torch.tensor([int(label)])
    if isinstance(query_x, dict):
        key = "labels" if target is None else label_key(target)
        inputs = {k: v.unsqueeze(0) for k, v in query_x.items() if k != key}
        return {**inputs, key: y}
    return (query_x.unsqueeze(0), y)


def relabel(target: Target, query, labels) -> tuple | dict:
    """``query`` (n examples: a tuple ``(x, y)`` or a dict of tensors) with its labels replaced by
    ``labels [n]`` (e.g. the labels each prediction should become)."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if isinstance(query, dict):
        key = label_key(target)
        n = next(iter(query.values())).shape[0]
        if labels.numel() != n:
            raise InfluenceKitError(f"{labels.numel()} desired labels for {n} queries; give one "
                                    "label per query.")
        return {**{k: v for k, v in query.items() if k != key}, key: labels}
    if isinstance(query, (tuple, list)) and len(query) == 2 and isinstance(query[0], torch.Tensor):
        if labels.numel() != query[0].shape[0]:
            raise InfluenceKitError(f"{labels.numel()} desired labels for {query[0].shape[0]} "
                                    "queries; give one label per query.")
        return (query[0], labels)
    raise InfluenceKitError(
        f"the queries must be a tuple (x, y) or a dict of tensors to be relabelled, got "
        f"{type(query).__name__}; collect them with ik.grads.collate(data, indices).")


def check_selector(selector: str) -> str:
    if selector not in SELECTORS:
        raise InfluenceKitError(f"selector={selector!r} is not one of {SELECTORS}")
    return selector


def selection_scores(target: Target, inverse: InverseCurvature | None, train, query_x,
                     desired_label: int, selector: str, runtime: Runtime | None = None,
                     train_gradients: torch.Tensor | None = None) -> torch.Tensor | None:
    """Scores ``[n_train]`` that rank training examples (larger = more helpful for the desired
    label); None for ``"random"``. ``train_gradients [n, p]`` (g_m, as ``Influence`` computes
    them) may be passed to avoid recomputing them for every query; for many queries,
    :func:`selection_matrix` needs no ``[n, p]`` matrix at all."""
    if check_selector(selector) == "random":
        return None
    runtime = resolve_runtime(runtime)
    g_q = query_gradient(target, query_x, desired_label, runtime)
    if train_gradients is None:
        train_gradients = gradients(target, train, runtime, of="loss")
    direction = selection_directions(inverse, g_q[None], selector, runtime)[0]
    return train_gradients.to(direction.dtype) @ direction


def selection_directions(inverse: InverseCurvature | None, query_grads: torch.Tensor,
                         selector: str, runtime: Runtime) -> torch.Tensor:
    """``[n_query, p]`` in the dtype of ``query_grads``: (C + λI)⁻¹ g_q (``"influence"``; the
    inverse solves in its own precision) or g_q (``"gradient_similarity"``)."""
    if selector == "influence":
        if inverse is None:
            raise InfluenceKitError("selector='influence' needs a fitted inverse")
        return inverse.solve(query_grads, runtime)
    if selector == "gradient_similarity":
        return query_grads
    raise InfluenceKitError(f"selector={selector!r} ranks no examples; use 'influence' or "
                            "'gradient_similarity' (random draws need no scores)")


def selection_matrix(target: Target, inverse: InverseCurvature | None, train, query,
                     desired_labels, selector: str = "influence",
                     runtime: Runtime | None = None) -> torch.Tensor:
    """Selection scores of many queries at once, ``[n_query, n_train]`` (row i = what
    :func:`selection_scores` returns for query i and its desired label).

    ``query``: the n_query queries as a tuple ``(x, y)`` or a dict of tensors (their own labels
    are ignored); ``desired_labels [n_query]``. One pass over ``train``: training gradients are
    streamed batch by batch (never an ``[n_train, p]`` matrix), only the ``[n_query, p]``
    directions are held. Pass row i to ``fix_prediction(..., scores=row)``.
    """
    runtime = resolve_runtime(runtime)
    relabelled = relabel(target, query, desired_labels)
    g_q = torch.cat([g for _, g in iter_gradients(target, relabelled, runtime, of="loss",
                                                  include_regularizer=False,
                                                  desc="query gradients")])
    direction = selection_directions(inverse, g_q, check_selector(selector), runtime)
    blocks = [direction @ g.to(direction.dtype).T
              for _, g in iter_gradients(target, train, runtime, of="loss",
                                         desc="selection scores")]
    return torch.cat(blocks, dim=1)


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
                   scores: torch.Tensor | None = None, params=None,
                   heldout_before: float | None = None, in_place: bool = False) -> FixResult:
    """Fine-tune on the k examples that most help ``desired_label`` for ``query_x``.

    Each step minimises ``mean_{m∈S} ℓ_m − harmful_weight · mean_{m∈H} ℓ_m + R`` over the
    fine-tuned parameters (H empty unless ``ascend_harmful``) with ``optimizer``: ``"adam"``,
    ``"sgd"`` or ``"normalized"`` (steps of length exactly ``lr``: θ ← θ − lr·∇/‖∇‖, which
    bounds how far each step moves the model, hence the collateral damage);
    training stops as soon as the query's argmax equals ``desired_label`` or after ``steps``.

    Args:
        target, inverse: what the selection scores are computed with (the Target's parameters
            are those of the influence; ``inverse`` fitted on its curvature).
        query_x: one example without batch dimension (a tensor, or a dict of tensors).
        heldout: optional classification data for the collateral damage (accuracy before and
            after); ``heldout_before``: its accuracy on the unchanged model when already known
            (skips one pass over it, e.g. when fixing many points).
        scores: precomputed selection scores ``[n_train]`` for this query (a row of
            :func:`selection_matrix`); then no gradient is computed for the selection.
        train_gradients: ``[n_train, p]`` g_m, to compute the scores without recomputing them.
        params: which parameters the fine-tuning moves (parameter or module names, as
            ``Target(params=...)``); default: the Target's. E.g. influence over the last two
            blocks of a transformer, fine-tuning only the last one.

    See :class:`FixResult` for the returned numbers (``params`` there is θ_T of the fine-tuned
    parameters, in the order of ``params``).
    """
    runtime = resolve_runtime(runtime)
    check_optimizer(optimizer)
    check_selector(selector)
    n = num_examples(as_loader(train, runtime, "training data"))
    copy = copy_target(target)
    copy.model.eval()
    if scores is None:
        scores = selection_scores(copy, inverse, train, query_x, desired_label, selector,
                                  runtime, train_gradients)
    elif selector == "random":
        raise InfluenceKitError("selector='random' draws examples at random: pass scores=None")
    elif scores.shape != (n,):
        raise InfluenceKitError(f"scores must have shape [n_train] = [{n}], got "
                                f"{tuple(scores.shape)}")
    helpful, harmful = select(scores, n, k, seed)
    if not ascend_harmful:
        harmful = []
    work = copy if params is None else Target(copy.model, copy.task, params=params,
                                              regularizer=copy.regularizer)
    dtype = next(iter(work.params().values())).dtype if runtime.dtype is None else runtime.dtype
    theta0 = work.flat_params(dtype, runtime.device)
    batch_s = cast_batch(collate(train, helpful, runtime), dtype, runtime.device)
    batch_h = (cast_batch(collate(train, harmful, runtime), dtype, runtime.device)
               if harmful else None)
    q_batch = cast_batch(query_batch(query_x, desired_label, work), dtype, runtime.device)

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
                              objective=selection_objective, optimizer=optimizer, lr=lr,
                              init=theta0, dtype=dtype,
                              stop=lambda flat: query_state(flat)[0] == desired_label,
                              runtime=runtime.replace(progress=False), desc="fine-tuning")
        final, used = result.params, result.steps
    now, loss_after = query_state(final)
    acc_before = acc_after = float("nan")
    if heldout is not None:
        acc_before = (accuracy(work, work.space.unflatten(theta0), heldout, runtime)
                      if heldout_before is None else float(heldout_before))
        acc_after = (acc_before if used == 0 else
                     accuracy(work, work.space.unflatten(final), heldout, runtime))
    if in_place:
        write_params(Target(target.model, target.task, params=list(work.space.names)), final)
    return FixResult(selector, len(helpful), helpful, harmful, before, now, int(desired_label),
                     now == desired_label, used, loss_before, loss_after,
                     loss_after - loss_before, float(-lr * used * (g_q @ g_sel)),
                     float(g_q @ (final - theta0)), acc_before, acc_after, final)
