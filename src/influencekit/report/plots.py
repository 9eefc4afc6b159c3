"""PNG figures of a report: example images, score histograms, response curves, LDS scatter,
leave-one-out scatter and removal curves (matplotlib, Agg backend, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_image(pixels: np.ndarray, shape, path: str | Path) -> Path:
    """One example as a PNG: ``pixels`` reshaped to ``shape`` (``[h, w]``, ``[c, h, w]`` or
    ``[h, w, c]``); grey scale with dark ink, or RGB when there are 3 channels."""
    plt = pyplot()
    image = np.asarray(pixels, dtype=np.float64).reshape(shape)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3:
        low, high = image.min(), image.max()
        plt.imsave(path, (image - low) / max(high - low, 1e-12))
    else:
        plt.imsave(path, image, cmap="gray_r")
    return Path(path)


def plot_histogram(counts: np.ndarray, edges: np.ndarray, path: str | Path,
                   marks: dict[str, float] | None = None) -> Path:
    """Histogram of one query's scores over the training set (log count axis)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3.3, 1.9))
    centres = (edges[:-1] + edges[1:]) / 2
    colours = ["#2e7d32" if c > 0 else "#c62828" for c in centres]
    ax.bar(centres, np.maximum(counts, 0), width=np.diff(edges), color=colours, alpha=0.8)
    ax.set_yscale("symlog", linthresh=1)
    ax.axvline(0, color="black", lw=0.6)
    for _, value in (marks or {}).items():
        ax.axvline(value, color="gray", lw=0.6, ls=":")
    ax.set_xlabel("score s (green: helpful, red: harmful)", fontsize=9)
    ax.set_ylabel("examples", fontsize=9)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_response(epsilons, real, tangent, path: str | Path, title: str) -> Path:
    """Real change of f when one example's weight is 1 + ε (re-optimised) beside the tangent."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    order = np.argsort(epsilons)
    eps = np.concatenate([[0.0], np.asarray(epsilons)[order]])
    real = np.concatenate([[0.0], np.asarray(real)[order]])
    tangent = np.concatenate([[0.0], np.asarray(tangent)[order]])
    order = np.argsort(eps)
    ax.plot(eps[order], real[order], "o-", label="re-optimised f(θ̂(ε)) − f(θ̂)")
    ax.plot(eps[order], tangent[order], "--", label="first order −ε·s/n")
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(0, color="gray", lw=0.5)
    ax.set_xlabel("ε (weight 1 + ε; ε = −1 removes the example)")
    ax.set_ylabel("change of the query's f")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_scatter(x, y, path: str | Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Predicted (x) against real (y), with the diagonal when both share a scale."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 3.6))
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    ax.scatter(x, y, s=12, alpha=0.7)
    low, high = min(x.min(), y.min()), max(x.max(), y.max())
    ax.plot([low, high], [low, high], color="gray", lw=0.6, ls="--")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_lds(predicted, real, path: str | Path, title: str) -> Path:
    """LDS scatter of one query: −Σ_{m∈S} s over subsets S (x) against f after retraining (y)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 3.6))
    ax.scatter(predicted, real, s=14, alpha=0.8)
    ax.set_xlabel("predicted: −Σ_{m in S} s_m (up to a constant)", fontsize=8)
    ax.set_ylabel("real: f after retraining on S", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_removal(ks, top, random, path: str | Path, title: str) -> Path:
    """Change of f after removing the k most helpful examples vs k random ones (per query)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    ks = np.asarray(ks)
    for q, (t, r) in enumerate(zip(np.atleast_2d(top), np.atleast_2d(random), strict=True)):
        line, = ax.plot(ks, t, "o-", label="top-k helpful removed" if q == 0 else None)
        ax.plot(ks, r, "x--", color=line.get_color(), label="k random removed" if q == 0 else None)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("k examples removed, then retrained")
    ax.set_ylabel("change of the query's f")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_response_curves(curves, path: str | Path, names=("m", "b"),
                         title: str = "response to a training example's weight") -> Path:
    """One panel per curve: each parameter's real θ(ε) (solid) and tangent (dashed)."""
    plt = pyplot()
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
