"""One function from a resolved config to the objects the Python API builds.

``build_run(config)`` calls the data and model factories, then builds exactly what a user would
write by hand::

    target = ik.Target(model, ik.ClassificationTask(**task), params=...,
                       regularizer=ik.L2Regularizer(l2_strength))
    method = ik.<Method>(**method)                     # or TracIn / TRAK with the target
    curvature = ik.Curvature(target, train, kind=kind)
    runtime = ik.Runtime(device=..., dtype=..., batch_size=...)

No maths here: scores come from ``Influence.pairwise`` (or the scorer's ``pairwise``).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..curvature import Curvature
from ..errors import ConfigError
from ..grads import as_loader
from ..inverse import InverseCurvature, block_diagonal
from ..runtime import Runtime
from ..scoring import TRAK, Influence, TracIn
from ..task import ClassificationTask, L2Regularizer, Target
from .config import import_object, method_classes, task_class
from .rundata import DISPLAY_KINDS, RunData, as_run_data

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a config builds.

    ``query`` holds only the selected queries; ``query_positions`` are their positions in the
    data factory's query set and ``query_ids`` their names. ``query_labels`` /
    ``query_predictions`` (``[n_query]``) and the accuracies are filled for classification.
    """

    config: dict
    data: RunData
    model: nn.Module
    target: Target
    train: Any
    query: Any
    query_positions: list[int]
    train_ids: list[str]
    query_ids: list[str]
    runtime: Runtime
    method: Any
    curvature: Curvature | None
    facts: dict = field(default_factory=dict)
    query_labels: torch.Tensor | None = None
    query_predictions: torch.Tensor | None = None
    train_labels: torch.Tensor | None = None

    @property
    def is_inverse(self) -> bool:
        return isinstance(self.method, InverseCurvature)


def build_runtime(config: dict, progress: bool | None = None) -> Runtime:
    """``Runtime`` from ``[runtime]``; ``progress`` is how to run, not part of the config."""
    section = config["runtime"]
    dtype = getattr(torch, section["dtype"]) if section["dtype"] else None
    return Runtime(device=section["device"], dtype=dtype, batch_size=section["batch_size"],
                   progress=progress)


def call_factory(key: str, path: str, args: dict, offered: dict):
    """Call the function at ``path`` with ``args`` plus those ``offered`` it has parameters for."""
    fn = import_object(f"{key}.factory", path)
    if not callable(fn):
        raise ConfigError(f"{key}.factory", path, "a callable", problem="is not callable")
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [a for a in args if a not in params and not takes_any]
    if unknown:
        raise ConfigError(f"{key}.args.{unknown[0]}", args[unknown[0]],
                          f"parameters of {path}: " + ", ".join(params),
                          problem="is not a parameter of the factory")
    extra = {k: v for k, v in offered.items() if k in params and k not in args}
    return fn(**args, **extra)


def build_run(config: dict, progress: bool | None = None) -> Run:
    """Build data, model, Target, method, Curvature and Runtime from a resolved config."""
    runtime = build_runtime(config, progress)
    try:
        data = as_run_data(call_factory("data", config["data"]["factory"],
                                        config["data"]["args"], {}))
    except TypeError as exc:
        raise ConfigError("data.factory", config["data"]["factory"],
                          "a function returning RunData(train=..., query=...)",
                          problem=f"returned the wrong thing ({exc})") from exc
    _check_display(data)
    model = call_factory("model", config["model"]["factory"], config["model"]["args"],
                         {"train": data.train})
    if not isinstance(model, nn.Module):
        raise ConfigError("model.factory", config["model"]["factory"],
                          "a function returning a torch.nn.Module",
                          problem=f"returned {type(model).__name__}")
    target = build_target(config, model)
    n_train = len(as_loader(data.train, runtime, "training data").dataset)
    n_candidates = len(as_loader(data.query, runtime, "query data").dataset)
    train_ids = _ids(data.train_ids, n_train, "train", "data.factory train_ids")
    candidate_ids = _ids(data.query_ids, n_candidates, "query", "data.factory query_ids")
    facts = {"n_train": n_train, "num_params": target.num_params,
             "n_query_candidates": n_candidates}
    labels = predictions = train_labels = None
    if isinstance(target.task, ClassificationTask):
        train_labels, train_pred = labels_and_predictions(target, data.train, runtime)
        labels, predictions = labels_and_predictions(target, data.query, runtime)
        facts["train_accuracy"] = float((train_pred == train_labels).double().mean())
        facts["query_accuracy"] = float((predictions == labels).double().mean())
    positions = select_queries(config["data"], n_candidates, labels, predictions)
    query = take_rows(data.query, positions)
    facts["n_query"] = len(positions)
    method = build_method(config["method"], target, model, data.train)
    curvature = (Curvature(target, data.train, kind=config["curvature"]["kind"])
                 if isinstance(method, InverseCurvature) else None)
    run = Run(config, data, model, target, data.train, query, positions, train_ids,
              [candidate_ids[p] for p in positions], runtime, method, curvature, facts,
              None if labels is None else labels[positions],
              None if predictions is None else predictions[positions], train_labels)
    log.info("built %s: p = %d, %d training examples, %d queries", config["method"]["name"],
             target.num_params, n_train, len(positions))
    return run


def build_target(config: dict, model: nn.Module) -> Target:
    """``Target(model, task, params=..., regularizer=L2Regularizer(l2_strength))`` from the
    config."""
    task_settings = dict(config["task"])
    cls = task_class(task_settings.pop("name"))
    task = cls(**task_settings)
    section = config["target"]
    names = list(section["params"])
    if section["modules"]:
        named = [n for n, p in model.named_parameters() if p.requires_grad]
        for module in section["modules"]:
            matched = [n for n in named if n == module or n.startswith(module + ".")]
            if not matched:
                modules = sorted({n.rsplit(".", 1)[0] for n in named})
                raise ConfigError("target.modules", module, "modules of the model: "
                                  + ", ".join(modules), problem="matches no parameter")
            names += [n for n in matched if n not in names]
    known = dict(model.named_parameters())
    for name in section["params"]:
        if name not in known:
            raise ConfigError("target.params", name, "parameter names of the model: "
                              + ", ".join(list(known)[:20]), problem="is not a parameter")
    regularizer = L2Regularizer(section["l2_strength"]) if section["l2_strength"] > 0 else None
    return Target(model, task, params=names or None, regularizer=regularizer)


def build_method(section: dict, target: Target, model: nn.Module, train):
    """The unfitted inverse, or the TracIn / TRAK scorer, of a resolved ``[method]`` table."""
    name = section["name"]
    args = {k: v for k, v in section.items() if k != "name"}
    if name == "TracIn":
        if args["checkpoints"]:
            factory = import_object("method.checkpoints", args["checkpoints"])
            checkpoints = factory(model=model, train=train)
        else:
            checkpoints = [target.flat_params()]
        return TracIn(target, checkpoints, learning_rates=args["learning_rates"])
    if name == "TRAK":
        from ..grads.projection import RandomProjection

        projection = (RandomProjection(args["projection_dim"], args["projection_kind"],
                                       args["seed"]) if args["projection_dim"] > 0 else None)
        return TRAK(target, projection=projection, damping=args["damping"],
                    output=args["output"])
    return build_inverse(section)


def build_inverse(section: dict) -> InverseCurvature:
    """An unfitted inverse from ``{"name": ..., **constructor arguments}``."""
    name = section["name"]
    args = {k: v for k, v in section.items() if k != "name"}
    if name == "block_diagonal":
        groups = {spec: build_inverse(m) for spec, m in args["groups"].items()} or None
        default = None if args["default"] is None else build_inverse(args["default"])
        return block_diagonal(groups, default=default)
    return method_classes()[name](**args)


def fit_inverse(run: Run) -> InverseCurvature:
    """``method.fit(Curvature(target, train, kind), runtime)`` (inverses only)."""
    return run.method.fit(run.curvature, run.runtime)


def compute_scores(run: Run, inverse: InverseCurvature | None = None) -> torch.Tensor:
    """Scores ``[n_query, n_train]`` with the sign and scale of ``ik.conventions``."""
    if run.is_inverse:
        return Influence(run.target, inverse).pairwise(run.query, run.train, run.runtime)
    return run.method.pairwise(run.query, run.train, run.runtime)


def compute_self_influence(run: Run, inverse: InverseCurvature | None = None) -> torch.Tensor:
    """``[n_train]`` self-influence g_mᵀ(C + λI)⁻¹g_m (TracIn's own for TracIn)."""
    if run.is_inverse:
        return Influence(run.target, inverse).self_influence(run.train, run.runtime)
    if isinstance(run.method, TracIn):
        return run.method.self_influence(run.train, run.runtime)
    raise ConfigError("score.self_influence", True, "false for TRAK (it has no self-influence)")


# -- data helpers (positions, labels, predictions) ---------------------------------------------
def take_rows(data, positions: list[int]):
    """``data`` restricted to ``positions`` (tuples of tensors stay tuples)."""
    index = torch.as_tensor(positions, dtype=torch.long)
    if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(t[index] for t in data)
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if not isinstance(dataset, Dataset):
        raise TypeError(f"cannot take rows of {type(data).__name__}")
    return Subset(dataset, list(positions))


def labels_and_predictions(target: Target, data, runtime: Runtime):
    """Integer labels and argmax predictions ``[n]`` of a classification Target."""
    params = target.params()
    labels, predicted = [], []
    with torch.no_grad():
        for batch in as_loader(data, runtime):
            outputs = target.outputs(params, batch)
            labels.append(torch.as_tensor(target.task.targets(batch)).reshape(-1).cpu())
            predicted.append(outputs.argmax(dim=-1).reshape(-1).cpu())
    return torch.cat(labels), torch.cat(predicted)


def select_queries(section: dict, n: int, labels=None, predictions=None) -> list[int]:
    """Positions (of ``n`` candidates) kept by ``data.select`` and ``data.max_queries``."""
    if section["select"] == "all":
        positions = list(range(n))
    elif labels is None:
        raise ConfigError("data.select", section["select"], "'all' (only a classification "
                          "task has predictions to call right or wrong)")
    else:
        right = predictions == labels
        keep = ~right if section["select"] == "misclassified" else right
        positions = keep.nonzero()[:, 0].tolist()
    if section["max_queries"] > 0:
        positions = positions[:section["max_queries"]]
    if not positions:
        raise ConfigError("data.select", section["select"], "a selection that keeps at least "
                          f"one of the {n} queries", problem="keeps no query")
    return positions


def _ids(ids, n: int, prefix: str, key: str) -> list[str]:
    if ids is None:
        return [f"{prefix} #{i}" for i in range(n)]
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise ConfigError(key, f"{len(ids)} names", f"one name per example ({n})",
                          problem="has the wrong length")
    return ids


def _check_display(data: RunData) -> None:
    kind = data.display.get("kind", "none")
    if kind not in DISPLAY_KINDS:
        raise ConfigError("data.factory display.kind", kind, ", ".join(DISPLAY_KINDS))
