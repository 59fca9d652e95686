"""Splitting a backbone at a feature level: the trainable suffix that maps that level's map to ``pre_logits``.

The frozen prefix needs no code of its own: it is ``FeatureMapExtractor`` stopped at the level (and its output can be
cached). Suffixes are model-family specific, so each family registers a builder in ``SUFFIX_BUILDERS``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fmtransfer.backbone.model import LevelInfo
from fmtransfer.errors import ConfigError


def efficientnet_suffix(model: nn.Module, level: LevelInfo) -> nn.Module:
    """EfficientNet/MobileNet-style: the blocks after ``blocks.<i>``, then conv_head, bn2 and global pooling."""
    block = int(level.module.split(".")[1])
    return nn.Sequential(*model.blocks[block + 1 :], model.conv_head, model.bn2, model.global_pool)


def resnet_suffix(model: nn.Module, level: LevelInfo) -> nn.Module:
    """ResNet-style: the layers after ``level.module`` (``act1`` is followed by the max-pool), then global pooling."""
    layers = ["layer1", "layer2", "layer3", "layer4"]
    head = [model.maxpool] if level.module == "act1" else []
    start = layers.index(level.module) + 1 if level.module in layers else 0
    return nn.Sequential(*head, *(getattr(model, n) for n in layers[start:]), model.global_pool)


SUFFIX_BUILDERS: dict[str, Callable[[nn.Module, LevelInfo], nn.Module]] = {
    "EfficientNet": efficientnet_suffix,
    "ResNet": resnet_suffix,
}


def split_level(levels: list[LevelInfo], trainable_stages: int) -> LevelInfo:
    """The feature level whose output feeds the last ``trainable_stages`` stages (counted in ``feature_info``)."""
    maps = [lv for lv in levels if lv.index is not None]
    if not 1 <= trainable_stages <= len(maps) - 1:
        raise ConfigError(
            f"regime.k={trainable_stages} (partial; regimes.partial.k in make compare): this backbone has "
            f"{len(maps)} feature_info stages, so k must be "
            f"between 1 and {len(maps) - 1} (use the finetune regime to train everything)."
        )
    return maps[len(maps) - 1 - trainable_stages]


def build_suffix(model: nn.Module, level: LevelInfo) -> nn.Module:
    """The part of ``model`` after ``level``, returning the pooled pre-logits vector."""
    family = type(model).__name__
    if family not in SUFFIX_BUILDERS:
        raise ConfigError(
            f"the partial regime cannot split a {family} backbone yet; supported families: "
            f"{sorted(SUFFIX_BUILDERS)} (add a builder to fmtransfer.backbone.split.SUFFIX_BUILDERS)."
        )
    return SUFFIX_BUILDERS[family](model, level)
