"""A run's trained model as one module, image tensor in, logits out: rebuilt the way its regime built it, then its
weights loaded strictly (a key or shape that does not match is an error, never a silently random layer).

For the frozen regime and partial's cached prefix the module reproduces what training read from the cache: maps
averaged down to the cache's size and stored at its dtype, then (for heads) globally averaged or pooled to the
head's grids; the head's feature normalisation is part of the head.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from fmtransfer.backbone import (
    PRE_LOGITS,
    FeatureMapExtractor,
    FixedBatchNormStats,
    LevelInfo,
    build_suffix,
    parse_levels,
    split_level,
    to_channels_last,
)
from fmtransfer.backbone.tuning import add_lora, merge_lora
from fmtransfer.cache import pool_map
from fmtransfer.deploy.rundir import FinishedRun, RunDirError
from fmtransfer.heads import GridPooling, LinearProbeHead, build_head, input_grids
from fmtransfer.regimes.live import PreLogitsOf
from fmtransfer.training import in_precision

CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class CachedLevels(nn.Module):
    """The frozen backbone's maps of ``levels`` as the cache stores them (extracted in ``precision``, pooled, cast)
    and heads read them (globally averaged to one vector per level)."""

    def __init__(self, extractor: FeatureMapExtractor, pool: str, pool_size: int, dtype: str, global_mean: bool):
        super().__init__()
        self.extractor = extractor.requires_grad_(False).eval()
        self.pool, self.pool_size, self.dtype = pool, int(pool_size), CACHE_DTYPES[dtype]
        self.global_mean = global_mean
        self.precision = "32-true"  # the run's extraction precision (set by build_classifier)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        with in_precision(self.precision, images.device.type):
            maps = self.extractor(images)
        for name, x in maps.items():
            x = pool_map(x.float(), self.pool, self.pool_size).to(self.dtype).float()
            out[name] = x.mean(dim=(2, 3)) if self.global_mean and x.ndim == 4 else x
        return out


class ImageClassifier(nn.Module):
    """``features`` (images -> what the head reads) then ``head`` (-> logits), in ``precision`` (cached maps in
    their own)."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head
        self.precision = "32-true"  # the run's training precision (set by build_classifier)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with in_precision(self.precision, images.device.type):
            return self.head(self.features(images)).float()


class SingleLevel(nn.Module):
    """The one map a partial suffix reads, out of the extractor's ``{level: map}``."""

    def __init__(self, features: nn.Module, level: str):
        super().__init__()
        self.features = features
        self.level = level

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)[self.level]


def _load(module: nn.Module, state: dict[str, torch.Tensor], run: FinishedRun) -> None:
    """Load ``state`` into ``module`` strictly: every key present, every shape the same."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RunDirError(
            f"run={run.path}: its checkpoint does not fit the {run.regime} model it describes: {exc}"
        ) from exc


def _trained(state: dict[str, torch.Tensor], prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The trained module's weights (``features.*``, ``head.*``), or those under ``prefix.`` without it."""
    if prefix is not None:
        return {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
    return {k: v for k, v in state.items() if k.split(".", 1)[0] in ("features", "head")}


def head_levels(run: FinishedRun) -> list[LevelInfo]:
    """The cached levels a frozen run's head reads."""
    return parse_levels(list(run.metrics["head"]["levels"]), run.spec.levels)


def head_grids(run: FinishedRun) -> tuple[int, ...]:
    """The grids a frozen run's head read each level at (``heads.grids``; (1,): global averages)."""
    return tuple(run.metrics["head"].get("grids") or input_grids(run.cfg.head.name, run.cfg.head.options))


def frozen_head(run: FinishedRun, state: dict | None = None) -> nn.Module:
    """A frozen run's trained head (pooled level vectors, or grid features -> logits), eval mode."""
    dims = run.metrics["head"].get("inputs") or {lv.name: lv.channels for lv in head_levels(run)}
    head = build_head(run.cfg.head.name, dims, len(run.class_names), **dict(run.cfg.head.options))
    _load(head, _trained(run.state_dict() if state is None else state, "head"), run)
    return head.eval()


def frozen_model(run: FinishedRun, state: dict) -> ImageClassifier:
    cache_cfg = run.cfg.cache
    extractor = FeatureMapExtractor(run.spec.create()[0], head_levels(run))
    grids = head_grids(run)
    global_mean = grids == (1,)
    features: nn.Module = CachedLevels(extractor, cache_cfg.pool, cache_cfg.pool_size, cache_cfg.dtype, global_mean)
    if not global_mean:
        features = nn.Sequential(features, GridPooling(grids))
    return ImageClassifier(features, frozen_head(run, state))


def _pre_logits(run: FinishedRun) -> LevelInfo:
    return next(lv for lv in run.spec.levels if lv.name == PRE_LOGITS)


def whole_backbone_model(run: FinishedRun, state: dict, backbone: nn.Module | None = None) -> ImageClassifier:
    regime = run.cfg.regime
    backbone = run.spec.create()[0] if backbone is None else backbone
    features: nn.Module = FeatureMapExtractor(backbone, [_pre_logits(run)])
    if regime.fixed_bn_stats:
        features = FixedBatchNormStats(features)
    model = ImageClassifier(features, LinearProbeHead({PRE_LOGITS: _pre_logits(run).channels}, len(run.class_names)))
    _load(model, _trained(state), run)
    return model


def lora_model(run: FinishedRun, state: dict) -> ImageClassifier:
    """A LoRA run's model: the adapters injected as training injected them, then the checkpoint loaded strictly."""
    regime = run.cfg.regime
    backbone = add_lora(run.spec.create()[0], regime.rank, regime.alpha, regime.dropout, regime.targets)
    return whole_backbone_model(run, state, backbone)


def partial_model(run: FinishedRun, state: dict) -> ImageClassifier:
    regime = run.cfg.regime
    level = split_level(list(run.spec.levels), int(regime.k))
    backbone = run.spec.create()[0]
    suffix: nn.Module = build_suffix(backbone, level)
    head = LinearProbeHead({PRE_LOGITS: _pre_logits(run).channels}, len(run.class_names))
    if regime.live_prefix:
        from fmtransfer.regimes.partial import LivePrefix

        trained: nn.Module = nn.Sequential(
            LivePrefix(FeatureMapExtractor(copy.deepcopy(backbone), [level]), level.name), PreLogitsOf(suffix)
        )
        if regime.fixed_bn_stats:
            trained = FixedBatchNormStats(trained)
        model = ImageClassifier(trained, head)
        _load(model, _trained(state), run)
        return model
    trained = PreLogitsOf(suffix)
    if regime.fixed_bn_stats:
        trained = FixedBatchNormStats(trained)
    module = ImageClassifier(trained, head)  # the keys the checkpoint holds: the suffix and the head
    _load(module, _trained(state), run)
    # The prefix as the cache stored its output: full maps (pool none) at the cache's dtype.
    prefix = CachedLevels(
        FeatureMapExtractor(copy.deepcopy(backbone), [level]), "none", 0, run.cfg.cache.dtype, global_mean=False
    )
    return ImageClassifier(nn.Sequential(SingleLevel(prefix, level.name), module.features), module.head)


# Registry: regime name (metrics.json "regime") -> the builder of its image classifier.
MODEL_BUILDERS: dict[str, Callable[[FinishedRun, dict], ImageClassifier]] = {
    "frozen": frozen_model,
    "partial": partial_model,
    "finetune": whole_backbone_model,
    "scratch": whole_backbone_model,
    "bitfit": whole_backbone_model,
    "surgical": whole_backbone_model,
    "lora": lora_model,
}


# Registry: regime -> how its model becomes plain layers for float32 use and export (LoRA: adapters merged into the
# weights; the same function within 1e-4 in float32, while in bf16 the merged weights round differently, so a
# run-precision model keeps them as trained).
PLAIN_WEIGHTS: dict[str, Callable[[nn.Module], nn.Module]] = {"lora": merge_lora}


def build_classifier(run: FinishedRun, run_precision: bool = True) -> ImageClassifier:
    """The run's model in eval mode, weights loaded weights-only and strictly.

    ``run_precision``: it computes as the run did (cached maps in the extraction precision, the rest in the training
    precision: bf16 autocast where the run used it; the run's memory layout), so it gives the run's own predictions;
    otherwise in float32, with plain layers (``PLAIN_WEIGHTS``: what ``make export`` writes).
    """
    if run.regime not in MODEL_BUILDERS:
        raise RunDirError(f"run={run.path}: regime {run.regime!r} cannot be rebuilt; known: {sorted(MODEL_BUILDERS)}.")
    model = MODEL_BUILDERS[run.regime](run, run.state_dict()).eval()
    if not run_precision and run.regime in PLAIN_WEIGHTS:
        PLAIN_WEIGHTS[run.regime](model)
    precision = run.precision if run_precision else {"training": "32-true", "extraction": "32-true"}
    for module in model.modules():
        if isinstance(module, (ImageClassifier, CachedLevels)):
            module.precision = precision["extraction" if isinstance(module, CachedLevels) else "training"]
    if run_precision and run.channels_last:
        to_channels_last(model)
    return model
