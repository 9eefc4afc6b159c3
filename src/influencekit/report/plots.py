"""Plots that are not per-example: response curves beside their tangents."""

from __future__ import annotations

from pathlib import Path

from .html import _pyplot


def plot_response_curves(curves, path: str | Path, names=("m", "b"),
                         title: str = "response to a training example's weight") -> Path:
    """One panel per curve: each parameter's real θ(ε) (solid) and tangent (dashed)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
    for ax, curve in zip(axes[0], curves, strict=True):
        eps = curve.epsilons.numpy()
        for j, name in enumerate(names):
            line, = ax.plot(eps, curve.theta[:, j].numpy(), label=f"{name}(ε) re-optimised")
            ax.plot(eps, curve.predicted_theta[:, j].numpy(), "--", color=line.get_color(),
                    label=f"{name} first order")
        ax.axvline(0, color="gray", lw=0.5)
        ax.set_xlabel("ε (weight = 1 + ε; ε = −1 removes the point)")
        ax.set_title(f"upweighting point {curve.index}", fontsize=10)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
