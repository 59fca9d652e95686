"""Analysis figures (matplotlib Figures; callers save or display them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fmtransfer.analysis.statistics import LevelStatistics


def statistics_figure(stats: Mapping[str, LevelStatistics]):
    """Per level: sparsity and class selectivity distributions over channels, and the dead-channel fraction."""
    names = list(stats)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].boxplot([stats[n].sparsity for n in names], tick_labels=names)
    axes[0].set(title="sparsity per channel (|x| ≈ 0)", ylim=(-0.02, 1.02))
    axes[1].bar(range(len(names)), [stats[n].dead.mean() for n in names])
    axes[1].set_xticks(range(len(names)), names)
    axes[1].set(title="dead channels (zero on ≥ 99% of images)", ylim=(0, 1))
    axes[2].boxplot([stats[n].selectivity for n in names], tick_labels=names)
    axes[2].set(title="class selectivity per channel", ylim=(-0.02, 1.02))
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def activation_grid(maps: np.ndarray, image: np.ndarray | None = None, top_n: int | None = 16, title: str = ""):
    """One image's channels of a level (``[C, H, W]``) as small images, most active first, input beside them."""
    maps = np.asarray(maps, dtype=np.float32)
    order = np.argsort(-np.abs(maps).mean(axis=(1, 2)))
    order = order[:top_n] if top_n else order
    cols = int(np.ceil(np.sqrt(len(order))))
    rows = int(np.ceil(len(order) / cols))
    extra = 1 if image is not None else 0
    fig = plt.figure(figsize=(1.4 * (cols + 2 * extra), 1.4 * rows + 0.5))
    grid = fig.add_gridspec(rows, cols + 2 * extra)
    if image is not None:
        ax = fig.add_subplot(grid[:, :2])
        ax.imshow(image)
        ax.set_title("input", fontsize=8)
        ax.axis("off")
    for k, ch in enumerate(order):
        ax = fig.add_subplot(grid[k // cols, 2 * extra + k % cols])
        ax.imshow(maps[ch], cmap="viridis")
        ax.set_title(f"ch {ch}", fontsize=7)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return fig


def depth_figure(accuracy: Mapping[str, float], split: str):
    names = list(accuracy)
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.bar(range(len(names)), [accuracy[n] for n in names], color=["C0"] * (len(names) - 1) + ["C1"])
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set(ylabel=f"{split} accuracy", title="transfer by depth: linear probe per level", ylim=(0, 1))
    fig.tight_layout()
    return fig


def cka_figure(names: Sequence[str], matrix: np.ndarray, title: str = "linear CKA between levels"):
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(names), 1 + 0.6 * len(names)))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(names)), names, rotation=45)
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7, color="grey")
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def embedding_figure(points: Mapping[str, np.ndarray], labels: np.ndarray, class_names: Sequence[str], method: str):
    names = list(points)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        xy = points[name]
        for k, cls in enumerate(class_names):
            mask = labels == k
            ax.scatter(xy[mask, 0], xy[mask, 1], s=5, label=cls if len(class_names) <= 12 else None)
        ax.set_title(f"{name} ({method})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(class_names) <= 12:
        axes[0][-1].legend(fontsize=6, markerscale=2, loc="best")
    fig.tight_layout()
    return fig


def saliency_figure(image: np.ndarray, cam: np.ndarray, occlusion: np.ndarray, title: str):
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    axes[0].imshow(image)
    axes[0].set_title("input")
    axes[1].imshow(image)
    axes[1].imshow(cam, cmap="jet", alpha=0.45)
    axes[1].set_title("Grad-CAM")
    im = axes[2].imshow(occlusion, cmap="inferno")
    axes[2].set_title("occlusion: drop in true-class prob.")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def image_rows_figure(rows: Mapping[str, np.ndarray], titles: Mapping[str, Sequence[str]] | None = None, title=""):
    """One row of small RGB images (``[N, H, W, 3]`` in [0, 1]) per key, the key as the row's label: activation
    maximisation per level, top-activating patches per channel."""
    cols = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.5 * cols + 0.6, 1.6 * len(rows) + 0.4), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(np.clip(images[c], 0, 1))
                if titles and name in titles:
                    ax.set_title(titles[name][c], fontsize=7)
        axes[r, 0].text(-0.1, 0.5, name, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def filters_figure(filters: np.ndarray, title: str = "first-layer filters"):
    """Colour patches of the first convolution's filters (``[N, k, k, 3]``), shown enlarged without smoothing."""
    cols = int(np.ceil(np.sqrt(len(filters))))
    rows = int(np.ceil(len(filters) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(0.8 * cols, 0.8 * rows + 0.4), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(filters):
            ax.imshow(filters[k], interpolation="nearest")
    fig.suptitle(title, fontsize=9)
    return fig
