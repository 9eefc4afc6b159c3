"""Each documented bad input raises its documented error, naming the problem and the fix."""

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.errors import (
    CurvatureTooLargeError,
    EmptyDatasetError,
    NonFiniteError,
    NotFittedError,
    NoTrainableParametersError,
    TaskOutputShapeError,
)

from .helpers import classification_data, mlp


def test_non_finite_loss_names_the_example():
    target = ik.Target(mlp(), ik.ClassificationTask())
    x, y = classification_data(n=10)
    x[6, 2] = float("nan")
    scorer = ik.Influence(target, ik.Exact(damping=1e-3).fit(
        ik.Curvature(target, classification_data(n=10), kind="ggn")))
    with pytest.raises(NonFiniteError, match="example 6") as info:
        scorer.pairwise(classification_data(n=2), (x, y), ik.Runtime(batch_size=4))
    assert info.value.index == 6


def test_non_finite_gradient_names_the_example():
    class SqrtTask(ik.RegressionTask):
        def loss(self, outputs, targets):  # sqrt'(0) = inf: finite loss, infinite gradient
            return torch.sqrt(((outputs - targets) ** 2).sum(dim=1))

    model = nn.Linear(2, 1).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    y = model(x).detach()  # residual exactly 0 for every example
    y[:3] += 1.0
    with pytest.raises(NonFiniteError, match="gradient of example 3"):
        ik.grads.gradients(ik.Target(model, SqrtTask()), (x, y))


def test_task_returning_wrong_shape():
    class Reduced(ik.ClassificationTask):
        def loss(self, outputs, targets):
            return nn.functional.cross_entropy(outputs, targets)  # mean over the batch: wrong

    target = ik.Target(mlp(), Reduced())
    with pytest.raises(TaskOutputShapeError, match=r"shape \[B\] = \[1\].*reduction='none'"):
        ik.grads.gradients(target, classification_data(n=4), ik.Runtime(batch_size=4))


def test_no_parameter_requires_grad():
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(NoTrainableParametersError, match="requires_grad"):
        ik.Target(model, ik.ClassificationTask())
    with pytest.raises(ValueError, match="neither a parameter nor a module"):
        ik.Target(mlp(), ik.ClassificationTask(), params=["nope"])


def test_empty_dataset():
    target = ik.Target(mlp(), ik.ClassificationTask())
    empty = (torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(EmptyDatasetError, match="empty"):
        ik.Exact().fit(ik.Curvature(target, empty))
    with pytest.raises(EmptyDatasetError):
        ik.grads.gradients(target, empty)


def test_dense_curvature_too_large_says_size_and_alternatives():
    target = ik.Target(mlp(d_in=50, hidden=40), ik.ClassificationTask())
    p = target.num_params
    small = ik.Runtime(max_dense_bytes=1_000_000)
    with pytest.raises(CurvatureTooLargeError) as info:
        ik.Exact().fit(ik.Curvature(target, classification_data(d_in=50)), small)
    message = str(info.value)
    assert f"{p:,} parameters" in message
    assert f"{p * p * 8 / 1e9:.1f} GB" in message
    assert "CG" in message and "EKFAC" in message


def test_solve_before_fit_and_wrong_shapes():
    with pytest.raises(NotFittedError, match="fit"):
        ik.Exact().solve(torch.zeros(3))
    target = ik.Target(mlp(), ik.ClassificationTask())
    inverse = ik.Exact(damping=1e-2).fit(ik.Curvature(target, classification_data()))
    with pytest.raises(ValueError, match="p = "):
        inverse.solve(torch.zeros(target.num_params + 1, dtype=torch.float64))


def test_singular_curvature_without_damping():
    model = nn.Linear(3, 1, bias=False).double()
    x = torch.zeros(4, 3, dtype=torch.float64)
    x[:, 0] = 1.0  # the other two directions carry no curvature
    target = ik.Target(model, ik.RegressionTask())
    with pytest.raises(ik.errors.InfluenceKitError, match="singular.*increase damping"):
        ik.Exact().fit(ik.Curvature(target, (x, torch.zeros(4, 1, dtype=torch.float64))))


def test_shuffled_loader_rejected():
    from torch.utils.data import DataLoader, TensorDataset

    target = ik.Target(mlp(), ik.ClassificationTask())
    loader = DataLoader(TensorDataset(*classification_data()), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        ik.grads.gradients(target, loader)
