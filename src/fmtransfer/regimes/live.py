"""Regimes that run (part of) the backbone every step: finetune and scratch, plus shared pieces for partial."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn

from fmtransfer.backbone import (
    PRE_LOGITS,
    FeatureMapExtractor,
    FixedBatchNormStats,
    depthwise_backward_in_float32,
    to_channels_last,
)
from fmtransfer.errors import ConfigError
from fmtransfer.heads import HeadClassifier, LinearProbeHead, PooledFeatureDataset, fit_regularised_probe
from fmtransfer.regimes.context import RunContext, start_run
from fmtransfer.training import ImageDataModule, RelativeGradNormLR, TrainingTools, fit_select_test, reseed

log = logging.getLogger(__name__)


@dataclass
class BackboneTraining:
    """Settings of a regime that trains (part of) the backbone and a linear head on ``pre_logits``."""

    fixed_bn_stats: bool  # the backbone keeps its pretrained BatchNorm statistics while its weights train
    epochs: int
    min_steps: int  # k-shot training sets are one batch: at least this many optimiser steps
    lr: float  # head
    backbone_lr: float
    weight_decay: float
    optimizer: str  # a name in timm's optimizer registry: adamw, momentum (SGD with momentum 0.9) ...
    batch_size: int
    monitor: str
    monitor_mode: str
    warmup_epochs: float  # linear warm-up of every learning rate (fractional epochs), then a cosine
    layer_decay: float | None  # timm's layer-wise LR decay for a whole timm backbone (None: one backbone LR)
    drop_path_rate: float  # stochastic depth in the trainable backbone, where the model has it
    label_smoothing: float
    augment: dict  # this regime's training images: each setting not None replaces data.augment's
    image_size: int | None  # None: the same preprocessing as the frozen regime

    def settings(self) -> dict:
        """The regime's settings, as ``metrics.json`` records them."""
        return asdict(self)

    def auto_rgn(self) -> bool:
        """Whether each backbone tensor's learning rate follows its relative gradient norm (``RelativeGradNormLR``)."""
        return False

    def probe_init(self) -> bool:
        """Whether the head starts as a linear probe on the frozen features (LP-FT's start)."""
        return False

    def fit(
        self,
        ctx: RunContext,
        head: nn.Module,
        features: nn.Module,
        datamodule: pl.LightningDataModule,
        callbacks: Sequence[pl.Callback] = (),
    ) -> dict:
        """Train ``features`` (trainable backbone part, at ``backbone_lr``) and ``head``; select; test once.

        ``trainer.channels_last`` runs the backbone part in NHWC layout; under CPU bf16 autocast its depthwise
        convolutions' backward runs in float32 (``depthwise_backward_in_float32``).
        """
        if ctx.tools.placement.channels_last:
            to_channels_last(features)
        depthwise_backward_in_float32(features)
        if self.fixed_bn_stats:
            features = FixedBatchNormStats(features)
        # Lightning keeps each module's mode at fit start, and backbones come in eval mode: set train mode explicitly
        # (a FrozenModule prefix and fixed BatchNorm statistics stay in eval through their own train()).
        features.train()
        head.train()
        epochs = ctx.planned_epochs(len(ctx.data.splits["train"]), self.batch_size, self.epochs, self.min_steps)
        rgn = RelativeGradNormLR() if self.auto_rgn() else None
        module = HeadClassifier(
            head,
            ctx.data.num_classes,
            lr=self.lr,
            backbone_lr=self.backbone_lr,
            weight_decay=self.weight_decay,
            max_epochs=ctx.schedule_epochs(epochs),
            label_smoothing=self.label_smoothing,
            features=features,
            warmup_epochs=self.warmup_epochs,
            layer_decay=self.layer_decay,
            per_tensor_lr=rgn is not None,
            optimizer=self.optimizer,
        )
        callbacks = [*callbacks, rgn] if rgn is not None else callbacks
        trainer = ctx.tools.fit_trainer(epochs, callbacks, trains_backbone=True, validate=not ctx.refit)
        # A final run from a probe scores that probe on test too: what training changed there, for the report.
        results = fit_select_test(
            trainer,
            module,
            datamodule,
            ctx.seed,
            refit=ctx.refit,
            evaluate_test=ctx.tools.evaluate_test,
            test_start=ctx.refit and ctx.tools.evaluate_test and self.probe_init(),
        )
        if rgn is not None:
            results["auto_rgn"] = rgn.mean_multipliers()
        return results


def pre_logits_head(ctx: RunContext, probe_init: bool, regime: str) -> LinearProbeHead:
    """A linear head on ``pre_logits``; with ``probe_init`` it starts as a probe fitted on the frozen features (LP-FT).

    The frozen pre-logits come from the feature cache (a hit when the frozen regime ran with the same settings).
    The probe is an L2-regularised logistic regression (``fit_regularised_probe``: strength by inner
    cross-validation) on the training split alone, in a fold as in a refit: the start a fold validates is the start
    its refit trains from, and it never saw the fold's validation images.
    """
    pre = next(lv for lv in ctx.spec.levels if lv.name == PRE_LOGITS)
    if probe_init:
        caches = ctx.cache_splits(ctx.cache_spec([pre]))
        train = PooledFeatureDataset.from_cache(caches["train"].split, [PRE_LOGITS])
    reseed(ctx.seed)
    head = LinearProbeHead({PRE_LOGITS: pre.channels}, ctx.data.num_classes)
    if probe_init:
        began = time.perf_counter()
        loss = fit_regularised_probe(head, train.features, train.labels, seed=ctx.seed)
        ctx.add_phase("probe", time.perf_counter() - began)
        log.info(f"{regime}: head starts as a linear probe on frozen pre_logits (training loss {loss:.3f})")
    return head


class PreLogitsOf(nn.Module):
    """Adapts a module returning the pooled vector (a backbone suffix) to the heads' ``{level: tensor}`` input."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {PRE_LOGITS: self.module(x).flatten(1)}


def image_datamodule(ctx: RunContext, batch_size: int) -> ImageDataModule:
    """The run's splits as decoded images, training images augmented by ``data.augment`` (``data.num_workers``
    workers, pinned memory on a GPU)."""
    return ImageDataModule(
        ctx.data.splits,
        ctx.data_config,
        batch_size,
        ctx.train_augment,
        num_workers=ctx.cfg.data.num_workers,
        pin_memory=ctx.tools.placement.cuda,
        decode_once_bytes=decode_once_bytes(
            ctx.cfg.data.get("decode_once", "auto"), ctx.tools.placement.resident_bytes
        ),
        origins=ctx.data.origin,
        bases=ctx.data.base_splits,
    )


def decode_once_bytes(setting, resident_bytes: int) -> int:
    """``data.decode_once``: auto (when the decoded splits fit in ``trainer.resident_data_mb``), true or false."""
    if setting == "auto":
        return resident_bytes
    if isinstance(setting, bool):
        return 2**62 if setting else 0
    raise ConfigError(f"data.decode_once={setting!r} must be auto, true or false.")


@dataclass
class WholeBackboneRegime(BackboneTraining):
    """The whole backbone and a linear head, trained on augmented images."""

    pretrained: ClassVar[bool] = True

    def tune(self, model: nn.Module) -> nn.Module:
        """``model`` with the parameters this regime trains marked trainable (here: all of them)."""
        return model

    def tuned(self, model: nn.Module, results: dict) -> dict | None:
        """What of the backbone trained, for ``metrics.json`` and the report (None: everything)."""
        return None

    def run(self, cfg: DictConfig, run_dir: Path, tools: TrainingTools, callbacks: Sequence[pl.Callback] = ()) -> dict:
        weights = None if self.pretrained else "random"  # None: backbone.weights
        ctx = start_run(cfg, run_dir, tools, weights=weights, image_size=self.image_size)
        head = pre_logits_head(ctx, probe_init=self.probe_init(), regime=self.name)
        reseed(ctx.seed)  # scratch's random initialisation must not depend on what ran before
        model, info = ctx.spec.create(drop_path_rate=self.drop_path_rate)
        model = self.tune(model)
        features = FeatureMapExtractor(model, [lv for lv in ctx.spec.levels if lv.name == PRE_LOGITS])
        results = self.fit(ctx, head, features, image_datamodule(ctx, self.batch_size), callbacks)
        tuned = self.tuned(model, results)
        extra = {"tuned": tuned} if tuned is not None else {}
        return ctx.metrics(self.name, results, regime_config=self.settings(), weights=info.detail, **extra)


@dataclass
class FinetuneRegime(WholeBackboneRegime):
    """Fine-tune the whole pretrained backbone (lower LR than the head), optionally from a linear probe (LP-FT)."""

    name: ClassVar[str] = "finetune"
    lp_ft: bool  # linear probe first, then fine-tune everything (LP-FT)

    def probe_init(self) -> bool:
        return self.lp_ft


@dataclass
class ScratchRegime(WholeBackboneRegime):
    """The same architecture from random initialisation, everything trained, with augmentation."""

    name: ClassVar[str] = "scratch"
    pretrained: ClassVar[bool] = False
