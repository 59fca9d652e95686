"""Per-image statistics on the test split: intervals that include test-set sampling, and paired differences.

Every run of a comparison predicts the same test images in the same order (``test_predictions.csv``), so two regimes
are compared on the same images: a paired bootstrap resamples test images once for both, which is what tells a
real difference from the luck of which images ended up in a small test split. Seeds are averaged inside each
resample, so the interval holds both sources of variation the report cares about.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fmtransfer.metrics import METRIC_NAMES

RESAMPLES = 2000


def read_predictions(path: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, preds)`` as class indices, in test-split order, from a run's ``test_predictions.csv``."""
    index = {name: i for i, name in enumerate(class_names)}
    with path.open(newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["index"]))
    return np.array([index[r["label"]] for r in rows]), np.array([index[r["pred"]] for r in rows])


def metric_value(metric: str, labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """accuracy, balanced accuracy (macro recall) or macro-F1, as torchmetrics computes them: macro averages run
    over the classes that occur among the labels or the predictions."""
    if metric == "acc":
        return float(np.mean(labels == preds))
    tp = np.bincount(labels[labels == preds], minlength=num_classes)
    support = np.bincount(labels, minlength=num_classes)
    predicted = np.bincount(preds, minlength=num_classes)
    fn, fp = support - tp, predicted - tp
    present = (tp + fp + fn) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "balanced_acc":
            per_class = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        elif metric == "f1_macro":
            per_class = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
        else:
            raise ValueError(f"unknown metric {metric!r}; choose from {METRIC_NAMES}")
    return float(per_class[present].mean()) if present.any() else 0.0


def _seed_mean(metric: str, labels: np.ndarray, preds: np.ndarray, num_classes: int, idx: np.ndarray) -> float:
    """The metric of each seed's predictions on the images ``idx``, averaged over seeds (``preds``: seeds x n)."""
    return float(np.mean([metric_value(metric, labels[idx], p[idx], num_classes) for p in preds]))


def _resampled(metric: str, labels: np.ndarray, preds: list[np.ndarray], num_classes: int, resamples: int, seed: int):
    """Seed-averaged metric of each prediction set in ``preds`` on the same bootstrap resamples of the test images."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    draws = rng.integers(0, n, size=(resamples, n))
    if metric == "acc":  # vectorised: the mean of per-image correctness, averaged over seeds
        return [np.asarray(p == labels, dtype=float).mean(0)[draws].mean(1) for p in preds]
    return [np.array([_seed_mean(metric, labels, p, num_classes, d) for d in draws]) for p in preds]


def bootstrap_interval(
    metric: str, labels: np.ndarray, preds: np.ndarray, num_classes: int, resamples: int = RESAMPLES, seed: int = 0
) -> dict:
    """``{"mean", "ci95", "se"}`` of the seed-averaged metric; percentile interval over test-image resamples."""
    preds = np.atleast_2d(preds)
    stats = _resampled(metric, labels, [preds], num_classes, resamples, seed)[0]
    mean = _seed_mean(metric, labels, preds, num_classes, np.arange(len(labels)))
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"mean": mean, "ci95": [float(lo), float(hi)], "se": float(stats.std(ddof=1))}


def paired_difference(
    metric: str,
    labels: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    num_classes: int,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict:
    """``{"diff", "ci95", "p_value"}`` of metric(a) - metric(b) on the same test images (each seed-averaged).

    The p-value is the two-sided bootstrap one: how often the resampled difference falls on the other side of 0,
    doubled (with the +1 correction, so it is never exactly 0).
    """
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    sa, sb = _resampled(metric, labels, [a, b], num_classes, resamples, seed)
    diffs = sa - sb
    everything = np.arange(len(labels))
    diff = _seed_mean(metric, labels, a, num_classes, everything) - _seed_mean(
        metric, labels, b, num_classes, everything
    )
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    tail = min(np.sum(diffs <= 0), np.sum(diffs >= 0))
    p_value = min(1.0, 2 * (tail + 1) / (len(diffs) + 1))
    return {"diff": diff, "ci95": [float(lo), float(hi)], "p_value": float(p_value)}
