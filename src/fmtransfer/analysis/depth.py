"""Transfer by depth: a linear probe on each cached level (globally pooled), and on all of them concatenated."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fmtransfer.cache import CachedSplit
from fmtransfer.heads import LinearProbeHead, PooledFeatureDataset, fit_probe_in_place

ALL_LEVELS = "all levels"


def subset(n: int, at_most: int | None) -> np.ndarray | None:
    """Sorted seeded random rows, at most ``at_most`` of ``n`` (None: all of them)."""
    if at_most is None or n <= at_most:
        return None
    return np.sort(np.random.default_rng(0).permutation(n)[:at_most])


def probe_accuracy(
    train: PooledFeatureDataset, evaluate: PooledFeatureDataset, levels: Sequence[str], steps: int = 300
) -> float:
    """Accuracy on ``evaluate`` of a linear probe fitted on ``train`` (both restricted to ``levels``)."""
    torch.manual_seed(0)
    head = LinearProbeHead({n: train.dims[n] for n in levels}, int(train.labels.max()) + 1, balance_levels=True)
    fit_probe_in_place(head, {n: train.features[n] for n in levels}, train.labels, steps=steps, lr=0.01)
    head.eval()
    with torch.no_grad():
        pred = head({n: evaluate.features[n] for n in levels}).argmax(1)
    return float((pred == evaluate.labels).float().mean())


def transfer_by_depth(
    train: CachedSplit, evaluate: CachedSplit, levels: Sequence[str] | None = None, max_images: int | None = None
) -> dict:
    """``{level: accuracy}`` for each level and for their concatenation (key ``"all levels"``), shallow to deep.

    Fit on ``train``, scored on ``evaluate``: pass the validation split so the test split stays untouched. With
    ``max_images``, each side is a seeded random subset of at most that many images (the curve of a large dataset
    for bounded time and memory).
    """
    levels = list(levels or train.level_names)
    tr = PooledFeatureDataset.from_cache(train, levels, rows=subset(train.num_samples, max_images))
    ev = PooledFeatureDataset.from_cache(evaluate, levels, rows=subset(evaluate.num_samples, max_images))
    out = {n: round(probe_accuracy(tr, ev, [n]), 6) for n in levels}
    out[ALL_LEVELS] = round(probe_accuracy(tr, ev, levels), 6)
    return out
