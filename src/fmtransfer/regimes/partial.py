"""The partial regime: the last k ``feature_info`` stages and the head are trained; the frozen prefix is cached."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn

from fmtransfer.backbone import FeatureMapExtractor, FrozenModule, build_suffix, split_level
from fmtransfer.cache import CacheSpec
from fmtransfer.heads import CachedMapDataset
from fmtransfer.regimes.common import SPLITS, start_run
from fmtransfer.regimes.live import PreLogitsOf, image_loaders, pre_logits_head, train_with_backbone
from fmtransfer.regimes.placement import feature_batches


class LivePrefix(nn.Module):
    """The frozen prefix run every step (on augmented images), returning the split level's map."""

    def __init__(self, extractor: FeatureMapExtractor, level: str):
        super().__init__()
        self.prefix = FrozenModule(extractor)
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefix(x)[self.level]


def run_partial(cfg: DictConfig, run_dir: Path, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """Train the last ``regimes.partial.k`` stages + a linear head.

    By default an epoch runs only the trainable suffix, on the frozen prefix's output read from the feature cache
    (extracted once, full resolution). ``regimes.partial.live_prefix=true`` runs the prefix every step instead, so
    the training images can be augmented.
    """
    rc = cfg.regimes.partial
    ctx = start_run(cfg, run_dir)
    level = split_level(list(ctx.spec.levels), rc.k)
    head = pre_logits_head(ctx, probe_init=rc.lp_init)
    model, _ = ctx.spec.create()
    suffix = build_suffix(model, level).requires_grad_(True)
    if rc.live_prefix:
        prefix = LivePrefix(FeatureMapExtractor(copy.deepcopy(model), [level]), level.name)
        features = nn.Sequential(prefix, PreLogitsOf(suffix))
        loaders = image_loaders(ctx, rc.batch_size, augment=True)
        extract_seconds = 0.0
    else:
        caches = ctx.cache_splits([level], CacheSpec((level,), cfg.cache.dtype, "none"))
        sets = {s: CachedMapDataset.from_cache(caches[s].split, level.name) for s in SPLITS}
        # Like the image loaders: no last training batch of one sample (BatchNorm in train mode cannot take it).
        loaders = {
            s: feature_batches(
                sets[s], rc.batch_size, s == "train", cfg, drop_last=s == "train" and len(sets[s]) > rc.batch_size
            )
            for s in SPLITS
        }
        features = PreLogitsOf(suffix)
        extract_seconds = sum(c.extract_seconds for c in caches.values())
    results = train_with_backbone(ctx, rc, head, features, loaders, callbacks)
    return ctx.metrics(
        "partial",
        results,
        regime_config=dict(rc),
        partial={"split_level": level.name, "split_module": level.module, "prefix_extract_seconds": extract_seconds},
    )
