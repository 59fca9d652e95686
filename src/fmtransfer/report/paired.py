"""Per-image statistics on the test split: intervals that include test-set sampling, and paired differences.

Every run of a comparison predicts the same test images in the same order (``test_predictions.csv``), so two regimes
are compared on the same images: a paired bootstrap resamples test images once for both, which is what tells a
real difference from the luck of which images ended up in a small test split. The bootstrap has two levels: each
resample draws seeds (jointly for every regime: seed s of every regime trained on the same k-shot subset), then test
images; the statistic is the metric averaged over the drawn seeds. So seed-to-seed (and subset-to-subset) variation
widens the interval as test-set sampling does. Draws are made in chunks, so memory stays bounded for 100k images.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fmtransfer.metrics import METRIC_NAMES

RESAMPLES = 2000
CHUNK_CELLS = 4_000_000  # resamples x images drawn at a time (a few tens of MB whatever the test split's size)


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
    """Seed-averaged metric of each prediction set in ``preds`` (each seeds x n) on the same two-level bootstrap
    resamples: seeds drawn with replacement (the same draw for every set when all have as many seeds, else drawn per
    set), then test images drawn with replacement (the same for every set)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    counts = {len(p) for p in preds}
    joint = len(counts) == 1
    chunk = max(1, CHUNK_CELLS // max(n, 1))
    out: list[list[np.ndarray]] = [[] for _ in preds]
    correct = [np.asarray(p == labels, dtype=np.float32) for p in preds] if metric == "acc" else None
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        images = rng.integers(0, n, size=(b, n))
        shared = rng.integers(0, next(iter(counts)), size=(b, next(iter(counts)))) if joint else None
        for k, p in enumerate(preds):
            drawn = shared if joint else rng.integers(0, len(p), size=(b, len(p)))
            if correct is not None:  # vectorised: seed weights x per-image correctness, then the images drawn
                weights = (drawn[:, :, None] == np.arange(len(p))).mean(1, dtype=np.float32)
                per_image = weights @ correct[k]
                out[k].append(np.take_along_axis(per_image, images, axis=1).mean(1))
            else:
                out[k].append(
                    np.array(
                        [
                            np.mean([metric_value(metric, labels[idx], p[s][idx], num_classes) for s in seeds])
                            for seeds, idx in zip(drawn, images, strict=True)
                        ]
                    )
                )
    return [np.concatenate(o) for o in out]


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


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (family-wise error over the winner's comparisons)."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    stepped = np.maximum.accumulate([(m - i) * p[j] for i, j in enumerate(order)]) if m else np.array([])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted.tolist()


def paired_se(metric: str, labels: np.ndarray, a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
    """The standard error of metric(a) - metric(b) on the same images (one prediction per image each): for accuracy
    the standard error of the mean per-image difference; for macro averages a paired bootstrap's (500 resamples)."""
    n = len(labels)
    if n < 2:
        return 0.0
    if metric == "acc":
        d = (a == labels).astype(float) - (b == labels).astype(float)
        return float(d.std(ddof=1) / np.sqrt(n))
    sa, sb = _resampled(metric, labels, [a[None], b[None]], num_classes, 500, 0)
    return float((sa - sb).std(ddof=1))
