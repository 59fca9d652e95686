"""Report figures (matplotlib, headless), each returned as PNG bytes."""

from __future__ import annotations

import csv
import io
from pathlib import Path

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


def read_epoch_log(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch ``val/acc``, ``val/loss`` and ``train/loss`` from a run's CSV log."""
    path = Path(run_dir) / "csv" / "metrics.csv"
    series: dict[str, list[tuple[int, float]]] = {"val/acc": [], "val/loss": [], "train/loss": []}
    if not path.is_file():
        return series
    rows = list(csv.DictReader(path.open()))
    fit_rows = rows[: next((i for i, r in enumerate(rows) if r.get("test/acc")), len(rows))]
    seen = set()
    for r in fit_rows:
        for key in series:
            if r.get(key) and (key, r["epoch"]) not in seen:
                seen.add((key, r["epoch"]))
                series[key].append((int(r["epoch"]), float(r[key])))
    return {k: v[:-1] if k.startswith("val") and len(v) > len(series["train/loss"]) else v for k, v in series.items()}


def learning_curves(runs: dict[str, Path]) -> bytes:
    """Validation accuracy and training loss per epoch, one line per regime."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    for regime, run_dir in runs.items():
        log = read_epoch_log(run_dir)
        if log["val/acc"]:
            ax_acc.plot(*zip(*log["val/acc"], strict=True), marker=".", label=regime)
        if log["train/loss"]:
            ax_loss.plot(*zip(*log["train/loss"], strict=True), marker=".", label=regime)
    ax_acc.set(title="validation accuracy", xlabel="epoch")
    ax_loss.set(title="training loss", xlabel="epoch", yscale="log")
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend()
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
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=regime)
    ax.set_xticks(range(len(keys)), keys)
    ax.set(xlabel="training images per class", ylabel="test accuracy", title="accuracy vs shots per class")
    ax.legend()
    return _png(fig)


def depth_curve(accuracy: dict[str, float], split: str) -> bytes:
    """The analysis stage's transfer-by-depth figure, as PNG bytes."""
    return _png(depth_figure(accuracy, split))
