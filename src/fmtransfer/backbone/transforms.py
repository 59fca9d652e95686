"""Preprocessing from the backbone's own timm data config, with an optional image-size override."""

from __future__ import annotations

from collections.abc import Callable

import timm.data
import torch
from PIL import Image

from fmtransfer.errors import ConfigError


def resolve_data_config(pretrained_cfg: dict, image_size: int | None = None, crop_pct: float | None = None) -> dict:
    """timm's data config (mean, std, interpolation, crop) from a model's ``pretrained_cfg``, with overrides."""
    cfg = dict(timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg))
    if crop_pct is not None:
        if not 0.1 <= float(crop_pct) <= 1.0:
            raise ConfigError(f"data.crop_pct={crop_pct} must be between 0.1 and 1.0 (1.0: no crop).")
        cfg["crop_pct"] = float(crop_pct)
    if image_size is not None:
        if int(image_size) < 16:
            raise ConfigError(f"data.image_size={image_size} is too small; use at least 16 (32+ recommended).")
        cfg["input_size"] = (cfg["input_size"][0], int(image_size), int(image_size))
    return cfg


def build_eval_transform(data_config: dict) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic resize + centre crop + normalise, as timm evaluates the model."""
    return timm.data.create_transform(**data_config, is_training=False)


def build_train_transform(data_config: dict) -> Callable[[Image.Image], torch.Tensor]:
    """timm's standard training augmentation (random resized crop, flip) for regimes that run the backbone live."""
    return timm.data.create_transform(**data_config, is_training=True)
