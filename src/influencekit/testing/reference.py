"""Reference problems with exact answers, shipped so users and tests can check any method."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..curvature import Curvature
from ..inverse import Exact
from ..scoring import Influence
from ..task import RegressionTask, Target

THESIS_X = (0.0, 1.0, 2.0)
THESIS_Y = (0.0, 1.5, 2.0)

# Values stated for the seed example (exact: m = 1, b = 1/6).
THESIS_THETA = (1.0, 1.0 / 6.0)
THESIS_PARAM_INFLUENCE = ((0.0833, -0.1389), (0.0, 0.1111), (-0.0833, 0.0278))
THESIS_LOSS_INFLUENCE = ((-0.046, 0.037, 0.009), (0.037, -0.074, 0.037), (0.009, 0.037, -0.046))


def thesis_data(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The three points {(0, 0), (1, 1.5), (2, 2)} as ``x [3, 1]``, ``y [3, 1]``."""
    x = torch.tensor(THESIS_X, dtype=dtype)[:, None]
    y = torch.tensor(THESIS_Y, dtype=dtype)[:, None]
    return x, y


def thesis_target(dtype=torch.float64) -> Target:
    """y = m·x + b with squared error, unregularised, at the least-squares optimum.

    Parameters are ``weight`` (m) then ``bias`` (b); the flat order is [m, b].
    """
    x, y = thesis_data(dtype)
    model = nn.Linear(1, 1).to(dtype)
    design = torch.cat([x, torch.ones_like(x)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution[:, 0]
    with torch.no_grad():
        model.weight.fill_(solution[0])
        model.bias.fill_(solution[1])
    return Target(model, RegressionTask())


@dataclass
class ThesisAnswer:
    """θ = [m, b]; ``param_influence [3, 2]``: ∂θ/∂w per point; ``loss_influence [3, 3]``:
    rows = upweighted point, columns = point whose loss changes (∂ℓ_col/∂w_row = −s/n)."""

    theta: list[float]
    param_influence: list[list[float]]
    loss_influence: list[list[float]]

    def to_json(self) -> dict:
        return {"theta": self.theta, "param_influence": self.param_influence,
                "loss_influence": self.loss_influence}


def solve_thesis(kind: str = "hessian") -> ThesisAnswer:
    """Exact influence on the thesis example through the library's own pipeline."""
    target = thesis_target()
    data = thesis_data()
    inverse = Exact(damping=0.0).fit(Curvature(target, data, kind=kind), stationarity=False)
    scorer = Influence(target, inverse)
    n = inverse.n_train_
    # Query = the training points themselves, measurement = their loss.
    loss_influence = (-scorer.pairwise(data, data) / n).T  # rows: upweighted point
    return ThesisAnswer(target.flat_params().tolist(),
                        scorer.parameter_influence(data).tolist(),
                        loss_influence.tolist())
