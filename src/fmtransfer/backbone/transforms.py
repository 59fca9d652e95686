"""Preprocessing from the backbone's own timm data config, with an optional image-size override."""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Mapping

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


# ``data.augment``'s settings: the arguments of timm's training transform that a user may set.
AUGMENT_KEYS = ("scale", "ratio", "hflip", "vflip", "color_jitter", "auto_augment", "re_prob")


def augment_settings(augment: Mapping | None, option: str = "data.augment") -> dict:
    """``data.augment`` (or the ``option`` named) checked and made plain (tuples for ranges): what
    ``build_train_transform`` is given."""
    settings = dict(augment or {})
    unknown = sorted(set(settings) - set(AUGMENT_KEYS))
    if unknown:
        raise ConfigError(f"{option} has unknown keys {unknown}; timm's training transform takes {list(AUGMENT_KEYS)}.")
    for key in ("scale", "ratio"):
        if settings.get(key) is not None:
            lo, hi = (float(v) for v in settings[key])
            if not 0 < lo <= hi:
                raise ConfigError(f"{option}.{key}={[lo, hi]} must be a range 0 < low <= high.")
            settings[key] = (lo, hi)
    return settings


def build_train_transform(data_config: dict, augment: Mapping | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """timm's training augmentation (random resized crop, flip, colour jitter) with ``data.augment``'s settings, for
    the regimes that train on images."""
    return timm.data.create_transform(**data_config, **augment_settings(augment), is_training=True)


class SeededView:
    """View ``view`` (of ``views``) of every image under a random ``transform``: image ``index``'s view is the same
    draw on every call (its random state comes from ``seed``, ``view`` and ``index`` alone) and differs between views.
    The global random states are left as they were. Called as ``transform(image, index)`` (``takes_index``)."""

    takes_index = True

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], view: int, views: int, seed: int):
        if not 0 <= view < views:
            raise ValueError(f"view {view} is not one of {views} views")
        self.transform, self.view, self.views, self.seed = transform, int(view), int(views), int(seed)

    def __call__(self, image: Image.Image, index: int) -> torch.Tensor:
        draw = zlib.crc32(f"{self.seed}/{self.view}/{int(index)}".encode())
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(draw)  # timm's random resized crop draws from Python's random
                torch.manual_seed(draw)  # flips and colour jitter draw from torch's
                return self.transform(image)
        finally:
            random.setstate(state)

    def __repr__(self) -> str:
        # What the cache key names: the transform, which view of how many, and the views' seed.
        return f"SeededView(view={self.view} of {self.views}, seed={self.seed}, {self.transform!r})"
