"""Preprocessing from the backbone's own timm data config, with an optional image-size override."""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Mapping

import timm.data
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import functional as F

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


# ``data.augment``'s settings: the arguments of timm's training transform that a user may set, and ``crop``.
AUGMENT_KEYS = ("crop", "scale", "ratio", "hflip", "vflip", "color_jitter", "auto_augment", "re_prob")
# ``crop``: timm's random resized crop (``scale`` and ``ratio`` its ranges), or a square the size the evaluation's
# centre crop frames (crop_pct of the short side) at a uniformly random position (``scale`` and ``ratio`` unused).
CROPS = ("random_resized", "eval_framing")


def augment_settings(augment: Mapping | None, option: str = "data.augment") -> dict:
    """``data.augment`` (or the ``option`` named) checked and made plain (tuples for ranges): what
    ``build_train_transform`` is given."""
    settings = dict(augment or {})
    unknown = sorted(set(settings) - set(AUGMENT_KEYS))
    if unknown:
        raise ConfigError(f"{option} has unknown keys {unknown}; timm's training transform takes {list(AUGMENT_KEYS)}.")
    if settings.get("crop") is not None and settings["crop"] not in CROPS:
        raise ConfigError(f"{option}.crop={settings['crop']!r} is not one of {list(CROPS)}.")
    for key in ("scale", "ratio"):
        if settings.get(key) is not None:
            if settings.get("crop") == "eval_framing":
                raise ConfigError(
                    f"{option}.{key} is not used with {option}.crop=eval_framing (its crops are the evaluation's "
                    f"size); set {option}.crop=random_resized to crop by {key}, or remove {key}."
                )
            lo, hi = (float(v) for v in settings[key])
            if not 0 < lo <= hi:
                raise ConfigError(f"{option}.{key}={[lo, hi]} must be a range 0 < low <= high.")
            settings[key] = (lo, hi)
    return settings


def merge_augment(shared: Mapping | None, own: Mapping | None, option: str = "regime.augment") -> dict:
    """``data.augment`` with a regime's own settings (those not null) over it, checked; the shared crop ranges give
    way to the regime's ``crop=eval_framing``, which does not use them."""
    own = {key: value for key, value in (own or {}).items() if value is not None}
    own = augment_settings(own, option)
    shared = augment_settings(shared)
    if own.get("crop") == "eval_framing":
        shared = {key: value for key, value in shared.items() if key not in ("scale", "ratio")}
    return {**shared, **own}


class RandomCropAtEvalFraming(RandomResizedCropAndInterpolation):
    """A square of the evaluation's framing (its centre crop's side: ``size / floor(size / crop_pct)`` of the short
    side) at a uniformly random position, resized to ``size``: the objects at the scale they are scored at, shifted.
    timm's random resized crop with ``scale`` crop_pct squared frames the same only on square images (on a 4:3 photo
    no such square fits the area, and timm falls back to one fixed centre crop of the whole short side)."""

    def __init__(self, size: int, crop_pct: float, interpolation):
        super().__init__(size, scale=(crop_pct**2, crop_pct**2), ratio=(1.0, 1.0))
        self.interpolation = interpolation
        self.crop_pct = crop_pct
        self.side_fraction = self.size[0] / math.floor(self.size[0] / crop_pct)  # as timm's evaluation resizes

    def get_params(self, img, scale=None, ratio=None) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of this image's crop (Python's ``random``, as timm's crop draws)."""
        width, height = F.get_image_size(img)
        side = max(1, min(width, height, round(min(width, height) * self.side_fraction)))
        return random.randint(0, height - side), random.randint(0, width - side), side, side

    def __repr__(self) -> str:
        return (
            f"RandomCropAtEvalFraming(size={self.size}, crop_pct={self.crop_pct}, interpolation={self.interpolation})"
        )


def build_train_transform(data_config: dict, augment: Mapping | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """timm's training augmentation (random resized crop, flip, colour jitter) with ``data.augment``'s settings, for
    the regimes that train on images; ``crop=eval_framing`` replaces its crop with ``RandomCropAtEvalFraming``."""
    settings = augment_settings(augment)
    crop = settings.pop("crop", None) or "random_resized"
    transform = timm.data.create_transform(**data_config, **settings, is_training=True)
    if crop == "eval_framing":
        timm_crop = transform.transforms[0]
        transform.transforms[0] = RandomCropAtEvalFraming(
            timm_crop.size[0], float(data_config["crop_pct"]), timm_crop.interpolation
        )
    return transform


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
