"""The frozen regime: cached feature maps of a frozen pretrained backbone -> a small head trained on them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn

from fmtransfer.backbone import LevelInfo, parse_levels
from fmtransfer.cache import CacheResult
from fmtransfer.errors import ConfigError
from fmtransfer.heads import HeadClassifier, PooledFeatureDataset, PooledFeatureStream, build_head, input_grids
from fmtransfer.regimes.context import RunContext, as_level_spec, start_run
from fmtransfer.training import CachedFeatureDataModule, TrainingTools, epochs_for, fit_select_test, reseed


@dataclass(frozen=True)
class HeadSettings:
    """The ``head`` config group: which head, on which cached levels, trained how."""

    name: str
    levels: Any  # names (level0..levelN, pre_logits), indices, or "all"
    options: dict
    lr: float
    weight_decay: float
    label_smoothing: float
    epochs: int
    min_steps: int
    batch_size: int
    monitor: str
    monitor_mode: str


def fit_head(
    head_cfg: HeadSettings,
    tools: TrainingTools,
    train_features: dict[str, torch.Tensor],
    datamodule: pl.LightningDataModule,
    num_classes: int,
    features: nn.Module | None = None,
    callbacks: Sequence[pl.Callback] = (),
    planned_epochs: Callable[[int, int, int, int], int] = epochs_for,
    refit: bool = False,
    schedule_epochs: Callable[[int], int] = lambda epochs: epochs,
    train_labels: torch.Tensor | None = None,
) -> dict:
    """The configured head, its normaliser fitted on ``train_features``, trained on ``datamodule`` (whose inputs
    ``features`` maps to the head's input, when given), selected on validation, tested once. ``planned_epochs``
    turns (training size, batch size, epochs, min steps) into the epochs to train; ``refit``: no validation (a refit on
    the whole labelled pool); ``schedule_epochs`` turns its epochs into the learning-rate schedule's horizon.

    A head that selects its inputs (``select``) chooses them from ``train_features`` and ``train_labels`` first.
    The results' ``head`` says what the head read: its input groups' widths, and the features it kept.
    """
    reseed(tools.seed)
    dims = {k: int(v.shape[1]) for k, v in train_features.items()}
    head = build_head(head_cfg.name, dims, num_classes, **dict(head_cfg.options))
    head.normalizer.fit(train_features)
    described: dict = {"inputs": dims}
    if hasattr(head, "select"):
        if train_labels is None:
            raise ValueError(f"head.name={head_cfg.name} selects its inputs: fit_head needs train_labels")
        began = time.perf_counter()
        head.select(train_features, train_labels)
        described.update(kept=head.kept_groups(), select_seconds=round(time.perf_counter() - began, 3))
    num_train = len(next(iter(train_features.values())))
    epochs = planned_epochs(num_train, head_cfg.batch_size, head_cfg.epochs, head_cfg.min_steps)
    module = HeadClassifier(
        head,
        num_classes,
        lr=head_cfg.lr,
        weight_decay=head_cfg.weight_decay,
        max_epochs=schedule_epochs(epochs),
        label_smoothing=head_cfg.label_smoothing,
        features=features,
    )
    trainer = tools.fit_trainer(epochs, callbacks, validate=not refit)
    results = fit_select_test(trainer, module, datamodule, tools.seed, refit=refit, evaluate_test=tools.evaluate_test)
    return {**results, "head": described}


@dataclass
class FrozenRegime:
    """A head on cached maps. ``cache.levels`` plus the head's levels are cached (so switching heads never
    re-extracts). Run again on the same run dir (``resume=<run dir>``) to resume an interrupted run."""

    name: ClassVar[str] = "frozen"
    head: dict
    monitor: str
    monitor_mode: str

    def run(self, cfg: DictConfig, run_dir: Path, tools: TrainingTools, callbacks: Sequence[pl.Callback] = ()) -> dict:
        ctx = start_run(cfg, run_dir, tools)
        head_cfg = HeadSettings(**self.head)
        head_levels = parse_levels(as_level_spec(head_cfg.levels), ctx.spec.levels)
        names = [lv.name for lv in head_levels]
        grids = input_grids(head_cfg.name, head_cfg.options)
        check_cache_grids(ctx.cfg.cache, head_cfg.name, grids)
        datamodule = CachedFeatureDataModule(
            lambda: cache_frozen_features(ctx, head_levels),
            lambda split: PooledFeatureDataset.from_cache(split, names, grids),
            head_cfg.batch_size,
            ctx.tools.placement,
            ctx.seed,
            # the one test pass pools the test split chunk by chunk (heads reading grids hold it whole)
            make_test_stream=(lambda split: PooledFeatureStream(split, names, head_cfg.batch_size))
            if tuple(grids) == (1,)
            else None,
            validates=not ctx.refit,
        )
        datamodule.setup("fit")  # the head's input sizes and normaliser come from the training features
        train_features = datamodule.sets["train"].features
        results = fit_head(
            head_cfg,
            ctx.tools,
            train_features,
            datamodule,
            ctx.data.num_classes,
            callbacks=callbacks,
            planned_epochs=ctx.planned_epochs,
            refit=ctx.refit,
            schedule_epochs=ctx.schedule_epochs,
            train_labels=datamodule.sets["train"].labels,
        )
        # A selecting head's fit before training is part of what the model costs, as LP-FT's probe is.
        ctx.add_phase("probe", results["head"].get("select_seconds", 0.0))
        return ctx.metrics(
            self.name,
            results,
            cache=cache_summary(datamodule.caches),
            head={"name": head_cfg.name, "levels": names, "grids": list(grids), **results["head"]},
        )


def check_cache_grids(cache_cfg: DictConfig, head_name: str, grids: Sequence[int]) -> None:
    """A head that reads ``g x g`` grids needs maps the cache kept at least that fine (no re-extraction)."""
    finest = max(grids)
    if finest > 1 and cache_cfg.pool == "global":
        raise ConfigError(
            f"head.name={head_name} reads {finest}x{finest} grids of each level, but cache.pool=global keeps one "
            f"vector per level: set cache.pool=avg (with cache.pool_size >= {finest}) or cache.pool=none."
        )
    if finest > 1 and cache_cfg.pool == "avg" and int(cache_cfg.pool_size) < finest:
        raise ConfigError(
            f"head.name={head_name} reads {finest}x{finest} grids of each level, but cache.pool_size="
            f"{cache_cfg.pool_size} keeps coarser maps: set cache.pool_size >= {finest} (or lower head.options.grids)."
        )


def cache_frozen_features(ctx: RunContext, head_levels: Sequence[LevelInfo]) -> dict[str, CacheResult]:
    """Cache ``cache.levels`` plus the head's levels."""
    levels = parse_levels(as_level_spec(ctx.cfg.cache.levels), ctx.spec.levels)
    levels = sorted(set(levels) | set(head_levels), key=ctx.spec.levels.index)
    return ctx.cache_splits(ctx.cache_spec(levels))


def cache_summary(caches: dict[str, CacheResult]) -> dict:
    """``metrics.json``'s ``cache``: hit or built, where, how long extraction took, bytes per image per level."""
    return {
        "hit": all(c.hit for c in caches.values()),
        "dir": str(caches["train"].split.path.parent),
        "entries": {s: str(c.split.path) for s, c in caches.items()},
        "hits": {s: c.hit for s, c in caches.items()},
        "extract_seconds": round(sum(c.extract_seconds for c in caches.values()), 3),
        "extract_seconds_by_split": {s: round(c.extract_seconds, 3) for s, c in caches.items()},
        "bytes_per_image": {n: r["bytes_per_image"] for n, r in caches["train"].split.manifest["levels"].items()},
    }
