"""Small problems with known answers for the diagnostics tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import influencekit as ik


def regression(n=40, d=3, seed=0, leverage_point=None, collinear=None):
    """Least squares y = Xw + b + noise at its exact optimum (float64). Returns target, (x, y)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if collinear is not None:
        x[:, 1] = x[:, 0] + collinear * torch.randn(n, generator=gen, dtype=torch.float64)
    if leverage_point is not None:
        x[0] = leverage_point
    w = torch.tensor([1.0, -2.0, 0.5][:d] + [0.3] * max(0, d - 3), dtype=torch.float64)
    y = (x @ w + 0.7 + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64))[:, None]
    return fitted_linear(x, y), (x, y)


def fitted_linear(x, y, task=None):
    model = nn.Linear(x.shape[1], 1).to(torch.float64)
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    sol = torch.linalg.lstsq(design, y).solution[:, 0]
    with torch.no_grad():
        model.weight.copy_(sol[:-1][None])
        model.bias.fill_(sol[-1])
    return ik.Target(model, task or ik.RegressionTask())


def design(x):
    return np.hstack([x.numpy(), np.ones((x.shape[0], 1))])


def leverages(x):
    a = design(x)
    return np.einsum("ij,jk,ik->i", a, np.linalg.inv(a.T @ a), a)


class Saddle(nn.Module):
    """Outputs θ broadcast to [B, 2]; with :class:`SaddleTask` the mean loss is
    (θ₁² − 1)² + t̄ θ₁ + mean (θ₂ − y)², with t̄ = 0: a saddle at θ = (0, ȳ), Hessian
    diag(−4, 2)."""

    def __init__(self, y_mean):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([0.0, y_mean], dtype=torch.float64))

    def forward(self, x):
        return self.theta.expand(x.shape[0], 2)


class SaddleTask(ik.Task):
    def loss(self, outputs, targets):
        o1, o2 = outputs[:, 0], outputs[:, 1]
        return (o1**2 - 1) ** 2 + targets[:, 0] * o1 + (o2 - targets[:, 1]) ** 2


def saddle(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=gen, dtype=torch.float64)
    t = t - t.mean()
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    x = torch.zeros(n, 1, dtype=torch.float64)
    targets = torch.stack([t, y], dim=1)
    target = ik.Target(Saddle(float(y.mean())), SaddleTask())
    return target, (x, targets)


class TanhNet(nn.Module):
    def __init__(self, hidden=3):
        super().__init__()
        self.inner = nn.Linear(1, hidden)
        self.outer = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.outer(torch.tanh(self.inner(x)))


def tanh_net(n=30, seed=0, steps=60):
    """A small tanh network fitted (by full-batch Adam) to data it cannot fit: large residuals
    make the Hessian differ from the Gauss-Newton matrix."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.linspace(-2, 2, n, dtype=torch.float64)[:, None]
    y = torch.sin(3 * x) + 0.8 * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    model = TanhNet().to(torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return ik.Target(model, ik.RegressionTask()), (x, y)
