"""Report figures (matplotlib, headless), each returned as PNG bytes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fmtransfer.analysis.figures import depth_figure


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# One colour per regime in every figure (matplotlib's tab10 order); other names follow in order.
REGIME_COLOURS = {
    "frozen": "C0",
    "partial": "C1",
    "finetune": "C2",
    "scratch": "C3",
    "bitfit": "C4",
    "lora": "C5",
    "surgical": "C6",
}


def regime_colour(regime: str) -> str:
    return REGIME_COLOURS.get(regime, f"C{4 + sum(map(ord, regime)) % 6}")


def learning_curves(curves: dict[str, dict]) -> bytes:
    """One panel per regime: the pooled out-of-fold validation loss at every validated epoch (0: the start), the
    chosen epoch marked. ``curves``: ``{regime: {"loss": {epoch: loss}, "chosen": epoch, "horizon": epochs}}``."""
    n = max(1, len(curves))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.0), squeeze=False)
    for ax, (regime, c) in zip(axes[0], curves.items(), strict=False):
        epochs = sorted(int(e) for e in c["loss"])
        losses = [c["loss"][str(e)] if str(e) in c["loss"] else c["loss"][e] for e in epochs]
        ax.plot(epochs, losses, marker=".", color=regime_colour(regime))
        chosen = c.get("chosen")
        if chosen is not None:
            ax.axvline(chosen, color="0.5", linestyle="--", linewidth=1)
        ax.set(
            title=f"{regime}: chosen epoch {chosen} of {c.get('horizon')}",
            xlabel="epochs trained (0: the start)",
            ylabel="pooled validation loss",
        )
        ax.title.set_fontsize(9)
    return _png(fig)


def confusion_matrix(matrix: list[list[int]], class_names: list[str], title: str) -> bytes:
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * n, 12), min(1.6 + 0.45 * n, 12)))
    ax.imshow(matrix, cmap="Blues")
    labels = class_names if n <= 30 else [str(i) for i in range(n)]
    ax.set_xticks(range(n), labels, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, matrix[i][j], ha="center", va="center", fontsize=8)
    return _png(fig)


def accuracy_vs_shots(summary: dict) -> bytes:
    """Mean test accuracy ± std against images per class ("all" drawn last)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    keys = sorted({k for by in summary.values() for k in by}, key=lambda k: float("inf") if k == "all" else int(k))
    for regime, by in summary.items():
        xs = [i for i, k in enumerate(keys) if k in by]
        ys = [by[keys[i]]["test"]["acc"]["mean"] for i in xs]
        es = [by[keys[i]]["test"]["acc"]["std"] for i in xs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=regime, color=regime_colour(regime))
    ax.set_xticks(range(len(keys)), keys)
    ax.set(xlabel="training images per class", ylabel="test accuracy", title="accuracy vs shots per class")
    ax.legend()
    return _png(fig)


def depth_curve(accuracy: dict[str, float], split: str) -> bytes:
    """The analysis stage's transfer-by-depth figure, as PNG bytes."""
    return _png(depth_figure(accuracy, split))
