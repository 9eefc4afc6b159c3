"""LiSSA: a (stochastic) Neumann series for (C + λI)⁻¹ g (Agarwal et al. 2017; Koh & Liang 2017)."""

from __future__ import annotations

import math

import torch

from ..curvature import Curvature
from ..errors import ConvergenceError
from ..grads import check_weights, num_examples, take
from .lazy import LazyInverse


class LiSSA(LazyInverse):
    """``(C + λI)⁻¹ g`` by the recursion ``x₀ = g, x_{t+1} = g + x_t − (C̃_t + λI) x_t / scale``.

    Fixed point: ``x* = scale · (C + λI)⁻¹ g``, and ``solve`` returns ``x_{n_iter} / scale``, so the
    answer converges to ``(C + λI)⁻¹ g`` — the SAME damped inverse as every other method.
    ``scale`` is only a step size: it changes how fast the series converges, never where to.

    Convergence needs ``scale`` ≥ the largest eigenvalue of ``C + λI`` (of every minibatch
    curvature ``C̃_t`` in the stochastic mode); the error after ``n_iter`` steps then shrinks like
    ``(1 − (e_min + λ)/scale)^n_iter``, so ``n_iter`` must be a few times ``scale / (e_min + λ)``.

    Args:
        damping: λ ≥ 0 in ``(C + λI)⁻¹``.
        scale: step size, > 0; must exceed the largest eigenvalue of C + λI.
        n_iter: number of recursion steps, all of them run (each one curvature-vector
            product for all rows).
        repeats: independent recursions averaged (variance reduction in the stochastic mode).
        minibatch_size: examples per minibatch curvature product ``C̃_t`` (drawn without
            replacement, fresh each step). ``None`` (default) or ≥ n: the full-batch curvature,
            a DETERMINISTIC run whose answer converges to ``(C + λI)⁻¹ g`` to machine precision.
        seed: seed of the minibatch sampler; every solve restarts from it, so solving rows
            together or one at a time gives the same answer.

    Divergence (a row's norm exceeding ``10 · ‖g‖ · min(t + 2, scale/λ)``, the bound of a
    convergent series with slack, or turning NaN) raises :class:`ConvergenceError` with a
    suggested larger ``scale``.

    Lazy (see :mod:`influencekit.inverse.lazy`): the training data is used at every solve; the
    store keeps settings and ``fit_info_`` only. After each solve ``last_step_norms_ [k]`` holds
    ``‖x_n − x_{n−1}‖ / ‖x_n‖`` (n = n_iter) per row, how much the last step still moved it.
    """

    def __init__(self, damping: float = 0.0, scale: float = 10.0, n_iter: int = 1000,
                 repeats: int = 1, minibatch_size: int | None = None, seed: int = 0):
        self.damping = damping
        self.scale = scale
        self.n_iter = n_iter
        self.repeats = repeats
        self.minibatch_size = minibatch_size
        self.seed = seed

    def _check_settings(self):
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0 (a step size), got {self.scale}")
        if self.n_iter < 1 or self.repeats < 1:
            raise ValueError(f"n_iter and repeats must be >= 1, got {self.n_iter}, {self.repeats}")
        if self.minibatch_size is not None and self.minibatch_size < 1:
            raise ValueError(f"minibatch_size must be None or >= 1, got {self.minibatch_size}")

    @property
    def deterministic(self) -> bool:
        """True when every product uses the full training set (no sampling)."""
        if self.minibatch_size is None:
            return True
        return self.minibatch_size >= self.curvature_.num_examples(self.product_runtime)

    def _solve(self, grads, runtime=None):
        g = grads.to(torch.float64)
        generator = torch.Generator().manual_seed(self.seed)
        repeats = 1 if self.deterministic else self.repeats
        total = torch.zeros_like(g)
        for _ in range(repeats):
            total += self._one_recursion(g, generator)
        return total / repeats / self.scale

    def _one_recursion(self, g, generator):
        x = g.clone()
        g_norm = g.norm(dim=1)
        step_norms = torch.zeros_like(g_norm)
        for t in range(self.n_iter):
            product = self._product(x, generator) + self.damping * x
            new = g + x - product / self.scale
            step_norms_prev, step_norms = step_norms, (new - x).norm(dim=1)
            x = new
            self._check_divergence(x, g_norm, t, step_norms_prev, step_norms)
        self.last_step_norms_ = step_norms / x.norm(dim=1).clamp_min(1e-300)
        return x

    def _product(self, x, generator):
        """C̃ x (without damping): full batch, or a fresh minibatch of ``minibatch_size``."""
        if self.deterministic:
            curvature = self.curvature_
        else:
            curvature = self._minibatch(generator)
        return curvature.matvec(x, self.product_runtime).to(x.dtype).to(x.device)

    def _minibatch(self, generator):
        c = self.curvature_
        n = num_examples(c.data)
        idx = torch.randperm(n, generator=generator)[: self.minibatch_size].sort().values
        weights = check_weights(c.weights, n, self.product_runtime)
        sub_weights = None if weights is None else weights[idx.to(weights.device)]
        if sub_weights is not None and float(sub_weights.sum()) <= 0:
            raise ValueError("a LiSSA minibatch drew only zero-weight examples; increase "
                             "minibatch_size (or drop zero-weight examples from the data).")
        subset = take(c.data, idx, self.product_runtime, "training data")
        return Curvature(c.target, subset, c.kind, sub_weights, n_samples=c.n_samples,
                         seed=c.seed)

    def _check_divergence(self, x, g_norm, t, prev_steps, steps):
        norms = x.norm(dim=1)
        bound = float(t + 2)
        if self.damping > 0:
            bound = min(bound, self.scale / self.damping)
        bad = ~torch.isfinite(norms) | (norms > 10 * bound * g_norm)
        if not bool(bad.any()):
            return
        suggestion = 10 * self.scale
        growth = (steps / prev_steps.clamp_min(1e-300))[bad]
        growth = growth[torch.isfinite(growth)]
        if t > 0 and growth.numel() and float(growth.max()) > 1:
            # A diverging mode grows by |1 − e/scale| = e/scale − 1 per step, so e ≈ scale·(1+ρ).
            top = self.scale * (1 + float(growth.max()))
            suggestion = float(f"{1.5 * top:.2g}")
        raise ConvergenceError(
            f"LiSSA diverged at step {t + 1} of {self.n_iter}: the norm of {int(bad.sum())} rows "
            f"grew past the bound of a convergent series ({_fmt(norms[bad].max())} vs "
            f"{_fmt(10 * bound * g_norm[bad].max())}). The scale {self.scale:g} is below the "
            "largest eigenvalue of C + λI (or of a minibatch curvature): increase scale, e.g. "
            f"LiSSA(scale={suggestion:g}, ...) and raise n_iter in proportion, or use larger "
            "minibatches (minibatch_size). If C + λI has negative eigenvalues (kind='hessian' of "
            "a "
            "non-convex loss) no scale converges: increase damping or use kind='ggn'.")


def _fmt(value) -> str:
    v = float(value)
    return "nan/inf" if not math.isfinite(v) else f"{v:.3g}"
