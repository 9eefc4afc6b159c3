"""A catalogue of bad inputs, each tried the way a user would, with the error it must get.

Every :class:`BadInput` builds a small problem (a float64 MLP on 12 examples, or a tiny
dict-input model) and makes ONE user-level call that must raise ``error`` (a subclass of
:class:`~influencekit.errors.InfluenceKitError`) whose message holds every string of
``fragments`` (the example's position, the problem, the fix) and whose ``index`` (for
:class:`~influencekit.errors.DataError` and :class:`~influencekit.errors.NonFiniteError`) is
``index``. :func:`try_case` runs one and returns what happened; the tests
(tests/test_bad_inputs.py) and ``benchmarks/reliability.py --bad-inputs`` (the table in
RELIABILITY.md) both run :data:`CASES`.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SubsetRandomSampler,
    TensorDataset,
)

from ..errors import (
    BatchLayoutError,
    DataError,
    EmptyDatasetError,
    InputDtypeError,
    LabelError,
    LoaderOrderError,
    ModelCallError,
    ModelMismatchError,
    NonFiniteError,
    TaskOutputShapeError,
    TrainingModeError,
)

F64 = torch.float64
N = 12


@dataclass(frozen=True)
class BadInput:
    """One bad input: ``run()`` makes the call; it must raise ``error`` with ``fragments`` in
    its message and ``index`` (when not None) as ``error.index``."""

    name: str
    group: str
    run: Callable[[], object]
    error: type
    fragments: tuple[str, ...]
    index: int | None = None


@dataclass
class Outcome:
    """What :func:`try_case` saw: ``ok`` when the expected error class came with every
    fragment and the index."""

    case: BadInput
    raised: str
    message: str
    missing: list[str] = field(default_factory=list)
    index: int | None = None

    @property
    def ok(self) -> bool:
        return self.raised == self.case.error.__name__ and not self.missing and (
            self.case.index is None or self.index == self.case.index)


def try_case(case: BadInput) -> Outcome:
    """Run one case (warnings silenced) and compare what it raised with what it must."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            case.run()
        except Exception as exc:  # the point is to record whatever comes out
            message = str(exc)
            return Outcome(case, type(exc).__name__, message,
                           [f for f in case.fragments if f not in message],
                           getattr(exc, "index", None))
    return Outcome(case, "nothing (it ran)", "", list(case.fragments))


# -- small problems ---------------------------------------------------------------------------
def _ik():
    import influencekit as ik  # the public API, as a user would (imported late: no cycle)
    return ik


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (N,), generator=g)
    return x, y


def _mlp(*middle: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), *middle, nn.Tanh(), nn.Linear(5, 3)).double().eval()


def _target(model=None, task=None):
    ik = _ik()
    return ik.Target(model if model is not None else _mlp(), task or ik.ClassificationTask())


def _scores(train, query=None, target=None, inverse=None, kind: str = "ggn", runtime=None,
            stationarity: bool = True):
    """Fit an inverse on ``train`` and score ``query`` (default two clean examples)."""
    ik = _ik()
    target = target or _target()
    inverse = (inverse or ik.Exact(damping=1e-3)).fit(ik.Curvature(target, train, kind=kind),
                                                     runtime, stationarity=stationarity)
    x, y = _data()
    query = query or (x[:2].abs(), y[:2])
    return ik.Influence(target, inverse).pairwise(query, train, runtime)


def _loader(**kwargs) -> DataLoader:
    x, y = _data()
    return DataLoader(TensorDataset(x, y), **{"batch_size": 5, **kwargs})


def _with_label(value) -> tuple:
    x, y = _data()
    y = y.clone()
    y[5] = value
    return x, y


class Reversed(Sampler):
    """A custom sampler that visits the data set backwards."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))

    def __len__(self):
        return self.n


class Pairs(Sampler):
    """A custom batch sampler: batches of two, in order (still refused: not the default)."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter([[i, i + 1] for i in range(0, self.n, 2)])

    def __len__(self):
        return self.n // 2


class DictExamples(Dataset):
    """A map-style data set whose examples are dicts ``{"x": [4], "y": ()}``."""

    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class TokenModel(nn.Module):
    """A tiny model called like a Hugging Face one: ``model(input_ids=..., attention_mask=...)``;
    ``per_token=True`` returns next-token logits ``[B, T, V]``, else class logits ``[B, K]``."""

    def __init__(self, vocab: int = 11, classes: int = 3, per_token: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, 6)
        self.head = nn.Linear(6, vocab if per_token else classes)
        self.per_token = per_token

    def forward(self, input_ids, attention_mask=None):
        hidden = self.embed(input_ids)
        if self.per_token:
            return self.head(hidden)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return self.head(pooled)


def _token_batch(labels=None) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 11, (N, 5), generator=g),
             "attention_mask": torch.ones(N, 5, dtype=torch.long)}
    if labels is not None:
        batch["labels"] = labels
    return batch


def _token_scores(task, batch, per_token: bool = False):
    ik = _ik()
    target = ik.Target(TokenModel(per_token=per_token).double(), task)
    inverse = ik.Diagonal(damping=1e-2).fit(ik.Curvature(target, batch, kind="ggn"))
    return ik.Influence(target, inverse).self_influence(batch)


def _reduced_task():
    ik = _ik()

    class MeanLoss(ik.ClassificationTask):
        def loss(self, outputs, targets):
            return nn.functional.cross_entropy(outputs, targets)  # mean over the batch

    return MeanLoss()


class Sqrt(nn.Module):
    """√x: NaN for a negative input although the input itself is finite."""

    def forward(self, x):
        return x.sqrt()


def _sqrt_problem():
    x, y = _data()
    x = x.abs() + 0.1
    x[7, 2] = -1.0
    torch.manual_seed(0)
    model = nn.Sequential(Sqrt(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    return _target(model), (x, y)


def _nan_input():
    x, y = _data()
    x = x.clone()
    x[7, 1] = float("nan")
    return x, y


def _other_model_inverse():
    """An inverse fitted on one MLP, scored with another of the same shape."""
    ik = _ik()
    train = _data()
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(_target(_mlp(seed=0)), train))
    other = _target(_mlp(seed=1))
    return ik.Influence(other, inverse).pairwise(train, train)


def _trained_further():
    ik = _ik()
    train = _data()
    target = _target()
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, train))
    result = ik.response.train(target, train, ik.response.batch_schedule(N, batch_size=None,
                                                                          steps=3), lr=0.1)
    ik.write_params(target, result.params)
    return ik.Influence(target, inverse).self_influence(train)


def _load_for_other_model():
    ik = _ik()
    train = _data()
    with tempfile.TemporaryDirectory() as folder:
        ik.storage.save_inverse(folder, ik.Exact(damping=1e-3).fit(
            ik.Curvature(_target(), train)))
        return ik.storage.load_inverse(folder, _target(_mlp(seed=1)))


def _attach_other_model():
    ik = _ik()
    train = _data()
    with tempfile.TemporaryDirectory() as folder:
        ik.storage.save_inverse(folder, ik.CG(damping=1e-3).fit(ik.Curvature(_target(), train)))
        loaded = ik.storage.load_inverse(folder)
        return loaded.attach(ik.Curvature(_target(_mlp(seed=1)), train))


def _stream_other_model():
    ik = _ik()
    train = _data()
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(_target(), train))
    return ik.stream_scores(ik.Influence(_target(_mlp(seed=1)), inverse), train, train, k=2)


def _tracin_other_model():
    ik = _ik()
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return ik.TracIn(_target(), [dict(other.named_parameters())]).pairwise(_data(), _data())


def _trak_other_model():
    ik = _ik()
    return ik.TRAK(_target(), models=[torch.zeros(50, dtype=F64)]).pairwise(_data(), _data())


def _train_mode_bn():
    model = _mlp(nn.BatchNorm1d(5))
    model.train()
    return _scores(_data(), target=_target(model))


def _train_mode_dropout():
    model = _mlp(nn.Dropout(0.5))
    model.train()
    return _scores(_data(), target=_target(model))


def _regression_wrong_shape():
    ik = _ik()
    x, _ = _data()
    torch.manual_seed(0)
    target = ik.Target(nn.Linear(4, 1).double(), ik.RegressionTask())
    return ik.grads.gradients(target, (x, torch.randn(N, 2, dtype=F64)))


def _one_logit():
    ik = _ik()
    x, y = _data()
    torch.manual_seed(0)
    target = ik.Target(nn.Linear(4, 1).double(), ik.ClassificationTask())
    return ik.grads.gradients(target, (x, (y > 0).long()))


def _weights(value):
    ik = _ik()
    w = torch.ones(N, dtype=F64)
    w[3] = value
    return ik.Exact(damping=1e-3).fit(ik.Curvature(_target(), _data(), weights=w))


def _build_cases() -> list[BadInput]:
    ik = _ik()
    x, y = _data()
    keep_order = ("Subset",)
    cases = [
        # -- loaders -------------------------------------------------------------------------
        BadInput("DataLoader(shuffle=True)", "loader order",
                 lambda: _scores(_loader(shuffle=True)), LoaderOrderError,
                 ("shuffle=True", *keep_order)),
        BadInput("DataLoader(sampler=SubsetRandomSampler)", "loader order",
                 lambda: _scores(_loader(sampler=SubsetRandomSampler(range(N)))),
                 LoaderOrderError, ("SubsetRandomSampler", "reorder", *keep_order)),
        BadInput("DataLoader(sampler=custom Sampler)", "loader order",
                 lambda: _scores(_loader(sampler=Reversed(N))), LoaderOrderError,
                 ("Reversed", *keep_order)),
        BadInput("DataLoader(batch_sampler=custom)", "loader order",
                 lambda: _scores(DataLoader(TensorDataset(x, y), batch_sampler=Pairs(N))),
                 LoaderOrderError, ("Pairs", *keep_order)),
        BadInput("DataLoader(batch_sampler=BatchSampler(RandomSampler))", "loader order",
                 lambda: _scores(DataLoader(TensorDataset(x, y), batch_sampler=BatchSampler(
                     RandomSampler(range(N)), 4, False))),
                 LoaderOrderError, ("RandomSampler", *keep_order)),
        BadInput("DataLoader(drop_last=True), 12 examples in batches of 5", "loader order",
                 lambda: _scores(_loader(drop_last=True)), LoaderOrderError,
                 ("drop_last=True", "2 example(s)", "positions 10 to 11", "drop_last=False"),
                 index=10),
        BadInput("DataLoader(batch_size=None)", "loader order",
                 lambda: _scores(_loader(batch_size=None)), LoaderOrderError,
                 ("batch_size=None",)),
        BadInput("DataLoader whose collate_fn drops an example", "loader order",
                 lambda: _scores(_loader(collate_fn=lambda rows: tuple(
                     torch.stack(t) for t in zip(*rows[:-1], strict=True)))),
                 LoaderOrderError, ("yielded 9 examples", "holds 12", "collate_fn")),
        # -- containers and layouts ----------------------------------------------------------
        BadInput("one example without a batch dimension: (x[0], y[0])", "layout",
                 lambda: _scores(_data(), query=(x[0], y[0])), BatchLayoutError,
                 ("0-dimensional", "x[None], y[None]")),
        BadInput("one example, only the labels batched: (x[0], y[:1])", "layout",
                 lambda: _scores(_data(), query=(x[0], y[:1])), BatchLayoutError,
                 ("disagree on the number of examples", "[4]", "[1]", "x[None]")),
        BadInput("tensors of 12 and 10 examples", "layout",
                 lambda: _scores((x, y[:10])), BatchLayoutError,
                 ("disagree on the number of examples",)),
        BadInput("a Dataset of dicts with the default (tuple) task", "layout",
                 lambda: _scores(DictExamples()), BatchLayoutError,
                 ("dict with keys ['x', 'y']", "SequenceClassificationTask",
                  "override inputs(batch) and targets(batch)")),
        BadInput("inputs without targets: TensorDataset(x)", "layout",
                 lambda: _scores(TensorDataset(x)), BatchLayoutError,
                 ("(inputs, targets, ...) tuples", "(x, y)")),
        BadInput("tuple batches given to SequenceClassificationTask", "layout",
                 lambda: _token_scores(ik.SequenceClassificationTask(), (x.long().abs(), y)),
                 BatchLayoutError, ("reads dict batches", "DictDataset")),
        BadInput("dict batches without the label key", "layout",
                 lambda: _token_scores(ik.SequenceClassificationTask(), _token_batch()),
                 BatchLayoutError, ("none of the keys ['labels']", "label_key=")),
        BadInput("an empty data set", "layout",
                 lambda: _scores((x[:0], y[:0])), EmptyDatasetError, ("empty",)),
        # -- labels --------------------------------------------------------------------------
        BadInput("label -100 (cross-entropy's ignore index) at example 5", "labels",
                 lambda: _scores(_with_label(-100)), LabelError,
                 ("example 5", "-100", "ignore index", "Subset"), index=5),
        BadInput("label -100 in a dict batch (SequenceClassificationTask)", "labels",
                 lambda: _token_scores(ik.SequenceClassificationTask(), _token_batch(
                     _with_label(-100)[1])), LabelError, ("example 5", "ignore index"), index=5),
        BadInput("label 7 for a 3-class model at example 5", "labels",
                 lambda: _scores(_with_label(7)), LabelError,
                 ("example 5 is 7", "3 classes (0 to 2)", "y - 1"), index=5),
        BadInput("label -1 at example 5", "labels",
                 lambda: _scores(_with_label(-1)), LabelError,
                 ("example 5 is -1", "3 classes"), index=5),
        BadInput("float labels for classification", "labels",
                 lambda: _scores((x, y.double())), LabelError,
                 ("float64", "integer class indices", "y.long()"), index=0),
        BadInput("one-hot labels [B, K]", "labels",
                 lambda: _scores((x, nn.functional.one_hot(y, 3))), LabelError,
                 ("shape [12, 3]", "one-hot", "y.argmax(dim=1)"), index=0),
        BadInput("token id 11 outside a vocabulary of 11 (CausalLMTask)", "labels",
                 lambda: _token_scores(ik.CausalLMTask(), _token_batch(
                     _token_batch()["input_ids"].index_put((torch.tensor([6]),
                                                            torch.tensor([3])),
                                                           torch.tensor(11))), per_token=True),
                 LabelError, ("token 3 of example 6", "vocabulary of 11"), index=6),
        BadInput("regression targets with 2 values for 1 output", "labels",
                 _regression_wrong_shape, LabelError,
                 ("example 0 hold 2 value(s)", "predicts 1", "y[:, None]"), index=0),
        # -- inputs and the model ------------------------------------------------------------
        BadInput("integer features into a float64 model", "inputs",
                 lambda: _scores((torch.randint(0, 3, (N, 4)), y)), InputDtypeError,
                 ("example 0", "int64", "x.float()"), index=0),
        BadInput("features of the wrong width (5 for Linear(4, ...))", "inputs",
                 lambda: _scores((torch.randn(N, 5, dtype=F64), y)), ModelCallError,
                 ("example 0", "RuntimeError", "mat1 and mat2"), index=0),
        BadInput("a classifier with one logit per example", "inputs",
                 _one_logit, TaskOutputShapeError, ("logits [B, K]", "[1, 1]", "two logits")),
        BadInput("model in train() mode with dropout", "model mode",
                 _train_mode_dropout, TrainingModeError,
                 ("'1' (Dropout, p=0.5)", "model.eval()")),
        BadInput("model in train() mode with batch norm", "model mode",
                 _train_mode_bn, TrainingModeError, ("'1' (BatchNorm1d)", "model.eval()")),
        # -- non-finite values ---------------------------------------------------------------
        BadInput("NaN in the input of training example 7 (Exact, GGN)", "non-finite",
                 lambda: _scores(_nan_input()), NonFiniteError, ("example 7", "NaN"), index=7),
        BadInput("NaN in the input of training example 7 (EKFAC)", "non-finite",
                 lambda: _scores(_nan_input(), inverse=ik.EKFAC(damping=1e-3)), NonFiniteError,
                 ("example 7", "NaN"), index=7),
        BadInput("NaN made by the model at example 7 (sqrt of a negative input; Exact)",
                 "non-finite", lambda: _scores(_sqrt_problem()[1], target=_sqrt_problem()[0]),
                 NonFiniteError, ("model's output for example 7",), index=7),
        BadInput("NaN made by the model at example 7 (EKFAC)", "non-finite",
                 lambda: _scores(_sqrt_problem()[1], target=_sqrt_problem()[0],
                                 inverse=ik.EKFAC(damping=1e-3)),
                 NonFiniteError, ("example 7",), index=7),
        BadInput("NaN made by the model at example 7 (CG: named at fit)", "non-finite",
                 lambda: _scores(_sqrt_problem()[1], target=_sqrt_problem()[0],
                                 inverse=ik.CG(damping=1e-3)),
                 NonFiniteError, ("loss value of example 7",), index=7),
        BadInput("NaN made by the model at example 7 (CG: in the curvature products)",
                 "non-finite",
                 lambda: _scores(_sqrt_problem()[1], target=_sqrt_problem()[0],
                                 inverse=ik.CG(damping=1e-3), stationarity=False),
                 NonFiniteError, ("model's output for example 7",), index=7),
        BadInput("NaN weight of example 3", "non-finite", lambda: _weights(float("nan")),
                 DataError, ("weight of example 3 is nan", "finite and non-negative"), index=3),
        BadInput("negative weight of example 3", "non-finite", lambda: _weights(-1.0),
                 DataError, ("weight of example 3 is -1.0",), index=3),
        # -- tasks ---------------------------------------------------------------------------
        *[BadInput(f"custom Task without reduction='none' (engine {engine})", "task",
                   lambda engine=engine: _scores(_data(), target=_target(task=_reduced_task()),
                                                 runtime=ik.Runtime(engine=engine)),
                   TaskOutputShapeError, ("MeanLoss.loss returned shape ()",
                                          "reduction='none'"))
          for engine in ("hooks", "vmap", "loop")],
        # -- fitted state of another model ---------------------------------------------------
        BadInput("an inverse fitted for another model of the same shape", "model mismatch",
                 _other_model_inverse, ModelMismatchError,
                 ("other parameter values", "allow_other_model=True")),
        BadInput("the model trained further after fitting", "model mismatch",
                 _trained_further, ModelMismatchError,
                 ("trained further after fitting", "Fit it again")),
        BadInput("load_inverse(folder, another model)", "model mismatch",
                 _load_for_other_model, ModelMismatchError, ("belongs to another model",)),
        BadInput("a stored CG inverse attached to another model's curvature", "model mismatch",
                 _attach_other_model, ModelMismatchError, ("belongs to another model",)),
        BadInput("stream_scores with another model's inverse", "model mismatch",
                 _stream_other_model, ModelMismatchError, ("other parameter values",)),
        BadInput("TracIn checkpoint of another architecture", "model mismatch",
                 _tracin_other_model, ModelMismatchError, ("other shapes", "another model")),
        BadInput("TRAK model vector of another size", "model mismatch",
                 _trak_other_model, ModelMismatchError, ("[p] = [43]", "another model")),
        # -- indices -------------------------------------------------------------------------
        BadInput("ik.grads.take(data, [12]) on 12 examples", "indices",
                 lambda: ik.grads.take(_data(), [0, 12]), DataError,
                 ("index 12", "holds 12 examples")),
    ]
    return cases


def cases() -> list[BadInput]:
    """The catalogue (built on first use)."""
    return _build_cases()
