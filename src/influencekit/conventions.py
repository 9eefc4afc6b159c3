"""Converters between the influence ``score`` and the quantities of the conventions table.

``score`` s = g_qᵀ (C + λI)⁻¹ g_m (no 1/n), where C is the curvature of the MEAN training loss and
n = Σ w (the number of training examples when unweighted). With f the query loss, s > 0 means
training example m helped: upweighting it lowers the loss. Every function keeps the input's shape.
"""

from __future__ import annotations


def weight_derivative(score, n: float):
    """∂f/∂w_m = −s / n: change of f per unit added to example m's weight."""
    return -score / n


def removal_effect(score, n: float):
    """Δf ≈ +s / n: predicted change of f when example m is removed (leave-one-out)."""
    return score / n


def koh_liang_up_loss(score):
    """Koh & Liang's I_up,loss = −s (up-weighting by ε changes the loss by about ε·I/n)."""
    return -score


def predicted_change(score, n: float, epsilon: float):
    """First-order change of f when example m's weight goes from 1 to 1 + ε: −ε·s / n."""
    return -epsilon * score / n
