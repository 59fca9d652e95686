"""Regimes that run (part of) the backbone every step: finetune and scratch, plus shared pieces for partial."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from fmtransfer.backbone import (
    PRE_LOGITS,
    FeatureMapExtractor,
    FixedBatchNormStats,
    build_eval_transform,
    build_train_transform,
    to_channels_last,
)
from fmtransfer.cache import CacheSpec
from fmtransfer.data import ImageClassificationDataset
from fmtransfer.heads import HeadClassifier, LinearProbeHead, PooledFeatureDataset, fit_probe_in_place
from fmtransfer.regimes.common import SPLITS, RunContext, epochs_for, fit_and_evaluate, reseed, start_run
from fmtransfer.regimes.placement import channels_last, uses_cuda


def image_loaders(ctx: RunContext, batch_size: int, augment: bool) -> dict[str, DataLoader]:
    """Decoded-image loaders: timm's training augmentation on train (if ``augment``), eval transform elsewhere."""
    train_tf = build_train_transform(ctx.data_config) if augment else build_eval_transform(ctx.data_config)
    eval_tf = build_eval_transform(ctx.data_config)
    workers = ctx.cfg.data.num_workers
    return {
        s: DataLoader(
            ImageClassificationDataset(ctx.data.splits[s], train_tf if s == "train" else eval_tf),
            batch_size=batch_size,
            shuffle=s == "train",
            drop_last=s == "train" and len(ctx.data.splits[s]) > batch_size,  # no 1-image BatchNorm batches
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=uses_cuda(ctx.cfg),
        )
        for s in SPLITS
    }


def pre_logits_head(ctx: RunContext, probe_init: bool) -> LinearProbeHead:
    """A linear head on ``pre_logits``; with ``probe_init`` it starts as a probe fitted on the frozen features (LP-FT).

    The frozen pre-logits come from the feature cache (a hit when the frozen regime ran with the same settings).
    """
    cfg = ctx.cfg
    pre = next(lv for lv in ctx.spec.levels if lv.name == PRE_LOGITS)
    if probe_init:
        spec = CacheSpec((pre,), cfg.cache.dtype, cfg.cache.pool, cfg.cache.pool_size)
        caches = ctx.cache_splits([pre], spec)
        train, val = (PooledFeatureDataset.from_cache(caches[s].split, [PRE_LOGITS]) for s in ("train", "validation"))
    reseed(cfg)
    head = LinearProbeHead({PRE_LOGITS: pre.channels}, ctx.data.num_classes)
    if probe_init:
        loss = fit_probe_in_place(head, train.features, train.labels, validation=(val.features, val.labels))
        print(f"[{cfg.regime}] head starts as a linear probe on frozen pre_logits (validation loss {loss:.3f})")
    return head


class PreLogitsOf(nn.Module):
    """Adapts a module returning the pooled vector (a backbone suffix) to the heads' ``{level: tensor}`` input."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {PRE_LOGITS: self.module(x).flatten(1)}


def train_with_backbone(
    ctx: RunContext,
    rc: DictConfig,
    head: nn.Module,
    features: nn.Module,
    loaders: dict[str, Iterable],
    callbacks: Sequence[pl.Callback] = (),
) -> dict:
    """Train ``features`` (trainable backbone part, at ``rc.backbone_lr``) and ``head`` with regime settings ``rc``.

    ``rc.fixed_bn_stats`` keeps the backbone's BatchNorm statistics as pretrained while its weights train;
    ``trainer.channels_last`` runs it in NHWC layout.
    """
    if channels_last(ctx.cfg):
        to_channels_last(features)
    if rc.get("fixed_bn_stats", False):
        features = FixedBatchNormStats(features)
    # Lightning keeps each module's mode at fit start, and backbones come in eval mode: set train mode explicitly
    # (a FrozenModule prefix and fixed BatchNorm statistics stay in eval through their own train()).
    features.train()
    head.train()
    epochs = epochs_for(len(ctx.data.splits["train"]), rc.batch_size, rc.epochs, rc.min_steps)
    module = HeadClassifier(
        head,
        ctx.data.num_classes,
        lr=rc.lr,
        backbone_lr=rc.backbone_lr,
        weight_decay=rc.weight_decay,
        max_epochs=epochs,
        features=features,
    )
    return fit_and_evaluate(ctx.cfg, module, loaders, ctx.run_dir, epochs, callbacks=callbacks)


def run_whole_backbone(
    cfg: DictConfig, run_dir: Path, regime: str, pretrained: bool, callbacks: Sequence[pl.Callback] = ()
) -> dict:
    """Train the whole backbone and a linear head on augmented images (finetune: pretrained; scratch: random)."""
    rc = cfg.regimes[regime]
    ctx = start_run(cfg, run_dir, weights=None if pretrained else "random", image_size=rc.image_size)
    head = pre_logits_head(ctx, probe_init=pretrained and rc.lp_ft)
    reseed(cfg)  # scratch's random initialisation must not depend on what ran before
    model, info = ctx.spec.create()
    pre = [lv for lv in ctx.spec.levels if lv.name == PRE_LOGITS]
    features = FeatureMapExtractor(model, pre)
    loaders = image_loaders(ctx, rc.batch_size, augment=True)
    results = train_with_backbone(ctx, rc, head, features, loaders, callbacks)
    return ctx.metrics(regime, results, regime_config=dict(rc), weights=info.detail)


def run_finetune(cfg: DictConfig, run_dir: Path, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """Fine-tune the whole pretrained backbone (lower LR than the head), optionally from a linear probe (LP-FT)."""
    return run_whole_backbone(cfg, run_dir, "finetune", pretrained=True, callbacks=callbacks)


def run_scratch(cfg: DictConfig, run_dir: Path, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """The same architecture from random initialisation, everything trained, with augmentation."""
    return run_whole_backbone(cfg, run_dir, "scratch", pretrained=False, callbacks=callbacks)
