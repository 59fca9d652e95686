"""The frozen regime: cached feature maps of a frozen pretrained backbone -> a small head trained on them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fmtransfer.backbone import LevelInfo, parse_levels
from fmtransfer.cache import CacheResult, CacheSpec
from fmtransfer.heads import HeadClassifier, PooledFeatureDataset, build_head
from fmtransfer.regimes.common import (
    SPLITS,
    RunContext,
    as_level_spec,
    epochs_for,
    fit_and_evaluate,
    reseed,
    start_run,
)
from fmtransfer.regimes.placement import feature_batches


def cache_frozen_features(ctx: RunContext, head_levels: Sequence[LevelInfo]) -> dict[str, CacheResult]:
    """Cache ``cache.levels`` plus the head's levels (so switching heads never re-extracts)."""
    cfg = ctx.cfg
    levels = parse_levels(as_level_spec(cfg.cache.levels), ctx.spec.levels)
    levels = sorted(set(levels) | set(head_levels), key=ctx.spec.levels.index)
    return ctx.cache_splits(levels, CacheSpec(tuple(levels), cfg.cache.dtype, cfg.cache.pool, cfg.cache.pool_size))


def train_head(
    cfg: DictConfig,
    caches: dict[str, CacheResult],
    head_levels: list[str],
    num_classes: int,
    run_dir: Path,
    callbacks: Sequence[pl.Callback] = (),
) -> dict:
    """Fit the configured head on cached train maps, select on validation, evaluate test once."""
    sets = {s: PooledFeatureDataset.from_cache(caches[s].split, head_levels) for s in SPLITS}
    loaders = {s: feature_batches(sets[s], cfg.head.batch_size, s == "train", cfg) for s in SPLITS}
    return fit_configured_head(cfg, sets["train"].features, loaders, num_classes, run_dir, callbacks=callbacks)


def fit_configured_head(
    cfg: DictConfig,
    train_features: dict[str, torch.Tensor],
    loaders: dict[str, Iterable],
    num_classes: int,
    run_dir: Path,
    features: nn.Module | None = None,
    callbacks: Sequence[pl.Callback] = (),
) -> dict:
    """The ``cfg.head`` head, its normaliser fitted on ``train_features``, trained on ``loaders`` (whose inputs
    ``features`` maps to the head's input, when given), selected on validation, tested once."""
    reseed(cfg)
    dims = {k: int(v.shape[1]) for k, v in train_features.items()}
    head = build_head(cfg.head.name, dims, num_classes, **OmegaConf.to_container(cfg.head.options))
    head.normalizer.fit(train_features)
    num_train = len(next(iter(train_features.values())))
    epochs = epochs_for(num_train, cfg.head.batch_size, cfg.head.epochs, cfg.head.min_steps)
    module = HeadClassifier(
        head,
        num_classes,
        lr=cfg.head.lr,
        weight_decay=cfg.head.weight_decay,
        max_epochs=epochs,
        label_smoothing=cfg.head.label_smoothing,
        features=features,
    )
    return fit_and_evaluate(cfg, module, loaders, run_dir, epochs, cfg.head.monitor, cfg.head.monitor_mode, callbacks)


def run_frozen(cfg: DictConfig, run_dir: Path, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """The whole frozen regime; writes ``metrics.json`` and the resolved config into ``run_dir``.

    Run again on the same ``run_dir`` (``make train ARGS="resume=<run dir>"``) to resume an interrupted run.
    """
    ctx = start_run(cfg, run_dir)
    head_levels = parse_levels(as_level_spec(cfg.head.levels), ctx.spec.levels)
    caches = cache_frozen_features(ctx, head_levels)
    results = train_head(cfg, caches, [lv.name for lv in head_levels], ctx.data.num_classes, run_dir, callbacks)
    return ctx.metrics(
        "frozen",
        results,
        cache={
            "hit": all(c.hit for c in caches.values()),
            "dir": str(caches["train"].split.path.parent),
            "entries": {s: str(c.split.path) for s, c in caches.items()},
            "hits": {s: c.hit for s, c in caches.items()},
            "extract_seconds": round(sum(c.extract_seconds for c in caches.values()), 3),
            "extract_seconds_by_split": {s: round(c.extract_seconds, 3) for s, c in caches.items()},
            "bytes_per_image": {n: r["bytes_per_image"] for n, r in caches["train"].split.manifest["levels"].items()},
        },
        head={"name": cfg.head.name, "levels": [lv.name for lv in head_levels]},
    )
