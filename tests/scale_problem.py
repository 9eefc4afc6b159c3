"""A small float64 problem shared by the scale tests and the scripts they launch in
subprocesses (torchrun workers, a store writer killed with SIGKILL).

Scripts import it as ``scale_problem`` (their folder is on ``sys.path``), tests as
``.scale_problem``; both build the same model, data and fitted inverse from fixed seeds.
"""

import torch
from torch import nn

import influencekit as ik


def build_problem(n_train=23, n_query=5, d_in=6, hidden=8, classes=3, damping=1e-2, seed=0,
                  n_fit=None):
    """``(influence, train, query)``: an Exact-inverse Influence of a float64 MLP, its
    curvature fitted on the first ``n_fit`` training examples (default all)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_query, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n_train + n_query,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(),
                          nn.Linear(hidden, classes)).double()
    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-3))
    train = (x[:n_train], y[:n_train])
    query = (x[n_train:], y[n_train:])
    fit_on = tuple(t[:n_fit] for t in train)
    inverse = ik.Exact(damping=damping).fit(ik.Curvature(target, fit_on, kind="ggn"))
    return ik.Influence(target, inverse), train, query
