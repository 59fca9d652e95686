"""The partial regime: the last k ``feature_info`` stages and the head are trained; the frozen prefix is cached."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn

from fmtransfer.backbone import FeatureMapExtractor, FrozenModule, build_suffix, split_level
from fmtransfer.cache import CacheResult
from fmtransfer.heads import AugmentedViewsDataset, CachedMapDataset
from fmtransfer.regimes.context import start_run
from fmtransfer.regimes.live import BackboneTraining, PreLogitsOf, image_datamodule, pre_logits_head
from fmtransfer.training import CachedFeatureDataModule, TrainingTools
from fmtransfer.training.datamodules import SPLITS


class LivePrefix(nn.Module):
    """The frozen prefix run every step (on augmented images), returning the split level's map."""

    def __init__(self, extractor: FeatureMapExtractor, level: str):
        super().__init__()
        self.prefix = FrozenModule(extractor)
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefix(x)[self.level]


@dataclass
class PartialRegime(BackboneTraining):
    """Train the last ``k`` stages + a linear head.

    By default an epoch runs only the trainable suffix, on the frozen prefix's output read from the feature cache
    (extracted once, full resolution): with ``views`` > 0, the prefix's output on that many augmented views of every
    training image (``data.augment``, drawn from ``view_seed``), a fresh view per image per epoch; with 0, on the
    un-augmented images. ``live_prefix`` runs the prefix every step on freshly augmented images instead.
    """

    name: ClassVar[str] = "partial"
    k: int  # trainable stages from the end, counted in the backbone's feature_info
    live_prefix: bool
    lp_init: bool  # start the head from a linear probe on the frozen features
    views: int = 0  # cached augmented views of each training image (0: the un-augmented maps)
    view_seed: int = 0  # the views' draws: fixed across training seeds, so every run reuses the same views

    def probe_init(self) -> bool:
        return self.lp_init

    def run(self, cfg: DictConfig, run_dir: Path, tools: TrainingTools, callbacks: Sequence[pl.Callback] = ()) -> dict:
        ctx = start_run(cfg, run_dir, tools, image_size=self.image_size)
        level = split_level(list(ctx.spec.levels), self.k)
        head = pre_logits_head(ctx, probe_init=self.probe_init(), regime=self.name)
        model, _ = ctx.spec.create(drop_path_rate=self.drop_path_rate)
        suffix = build_suffix(model, level).requires_grad_(True)
        views: list[CacheResult] = []  # the cached augmented views this run trains on, if any
        if self.live_prefix:
            prefix = LivePrefix(FeatureMapExtractor(copy.deepcopy(model), [level]), level.name)
            features = nn.Sequential(prefix, PreLogitsOf(suffix))
            datamodule = image_datamodule(ctx, self.batch_size)
            extract_seconds = 0.0
        else:
            features = PreLogitsOf(suffix)
            spec = ctx.cache_spec([level], pool="none")
            # A run that keeps its start trains on nothing: V views would cost V prefix passes for no step.
            use_views = self.views > 0 and not ctx.keeps_start

            def train_views() -> AugmentedViewsDataset:
                views.extend(ctx.cache_train_views(spec, self.views, self.view_seed))
                return AugmentedViewsDataset.from_cache([v.split for v in views], level.name, seed=ctx.seed)

            # A refit validates nothing; on views (or for 0 epochs) it reads none of the pool's un-augmented maps.
            splits = ("test",) if ctx.refit and (use_views or ctx.keeps_start) else SPLITS
            datamodule = CachedFeatureDataModule(
                lambda: ctx.cache_splits(spec, splits),
                lambda split: CachedMapDataset.from_cache(split, level.name),
                self.batch_size,
                ctx.tools.placement,
                ctx.seed,
                drop_last_train=True,
                make_train=train_views if use_views else None,
                validates=not ctx.refit,
            )
            datamodule.setup("fit")  # extract (or find) the prefix output before training is timed
            extract_seconds = sum(c.extract_seconds for c in [*datamodule.caches.values(), *views])
        results = self.fit(ctx, head, features, datamodule, callbacks)
        split = {
            "split_level": level.name,
            "split_module": level.module,
            "prefix_extract_seconds": extract_seconds,
            "training_maps": "live" if self.live_prefix else f"{len(views)} cached views" if views else "cached",
        }
        return ctx.metrics(self.name, results, regime_config=self.settings(), partial=split)
