"""The seed thesis example: exact values stated in the issue, to 1e-4."""

import numpy as np
import pytest

from influencekit.testing import (
    THESIS_LOSS_INFLUENCE,
    THESIS_PARAM_INFLUENCE,
    THESIS_THETA,
    solve_thesis,
)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_thesis_numbers(kind):
    answer = solve_thesis(kind)
    np.testing.assert_allclose(answer.theta, THESIS_THETA, atol=1e-4)
    np.testing.assert_allclose(answer.param_influence, THESIS_PARAM_INFLUENCE, atol=1e-4)
    # The stated loss influences are rounded to 3 decimals.
    np.testing.assert_allclose(answer.loss_influence, THESIS_LOSS_INFLUENCE, atol=6e-4)


def test_thesis_closed_form():
    """Against the hand-derived closed form: H = (2/3)[[5, 3], [3, 3]], g_i = 2 r_i [x_i, 1]."""
    x = np.array([0.0, 1.0, 2.0])
    y = np.array([0.0, 1.5, 2.0])
    m, b = 1.0, 1.0 / 6.0
    design = np.stack([x, np.ones(3)], axis=1)
    hessian = 2 * design.T @ design / 3
    grads = 2 * (design @ [m, b] - y)[:, None] * design
    param_influence = -np.linalg.solve(hessian, grads.T).T / 3
    loss_influence = param_influence @ grads.T
    answer = solve_thesis("hessian")
    np.testing.assert_allclose(answer.param_influence, param_influence, atol=1e-12)
    np.testing.assert_allclose(answer.loss_influence, loss_influence, atol=1e-12)
    assert abs(answer.param_influence[1][0]) < 1e-12  # exactly zero, not 0.00093
