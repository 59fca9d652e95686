"""The visualisations of ``visualise.py`` on an opened analysis (a config's splits, backbone and cache): which
channels to show, which photo, which images, and whether a channel's peaks come from the cache or a live pass."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fmtransfer.analysis.run import Analysis, input_image
from fmtransfer.analysis.statistics import receptive_fields
from fmtransfer.analysis.visualise import level_maps, maximise_channels, top_activating_patches
from fmtransfer.backbone import FeatureMapExtractor, FrozenModule, LevelInfo, build_eval_transform
from fmtransfer.data import ImageClassificationDataset, to_rgb

PATCH_PX = 64  # every patch is shown at this size, whatever its receptive field


def level_info(an: Analysis, name: str) -> LevelInfo:
    return next(lv for lv in an.ctx.spec.levels if lv.name == name)


def most_active_channels(an: Analysis, level: str, n: int, split: str = "train") -> list[int]:
    """The ``n`` channels of ``level`` with the highest mean activation over ``split`` (from the cache)."""
    pooled = an.pooled(split, [level]).features[level]
    return [int(c) for c in torch.argsort(pooled.mean(0), descending=True)[:n]]


def natural_photo(an: Analysis, split: str = "validation", index: int = 0) -> tuple[np.ndarray, torch.Tensor, str]:
    """A natural photo as displayed and as the backbone's normalised input: scikit-image's cat (``chelsea``) when
    the dataset is not photos of its own (the embedded digits), else an image of ``split``."""
    if str(an.ctx.cfg.data.path).startswith("sklearn:"):
        from PIL import Image
        from skimage import data as skdata

        image, caption = Image.fromarray(skdata.chelsea()), "scikit-image's chelsea (a shipped photo)"
    else:
        image, caption = to_rgb(an.ctx.data.splits[split][index]["image"]), f"{split} image {index}"
    shown = build_eval_transform(dict(an.ctx.data_config, mean=(0.0,) * 3, std=(1.0,) * 3))(image)
    return shown.permute(1, 2, 0).clamp(0, 1).numpy(), build_eval_transform(an.ctx.data_config)(image), caption


def photo_maps(an: Analysis, model: torch.nn.Module) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """A natural photo and its full-resolution maps at every spatial level (not the cache's pooled ones)."""
    shown, normalised, caption = natural_photo(an)
    spatial = [lv for lv in an.ctx.spec.levels if lv.index is not None]
    return shown, level_maps(model, spatial, normalised), caption


def maximisation_rows(
    an: Analysis, model: torch.nn.Module, levels: Sequence[str], n_channels: int, size: int, steps: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Per level, images that maximise its ``n_channels`` most active channels (on the training split)."""
    rows, titles = {}, {}
    for name in levels:
        channels = most_active_channels(an, name, n_channels)
        mean, std = an.ctx.data_config["mean"], an.ctx.data_config["std"]
        rows[name] = maximise_channels(model, level_info(an, name), channels, mean, std, size, steps, seed=seed)
        titles[name] = [f"ch {c}" for c in channels]
    return rows, titles


def split_maps(an: Analysis, model: torch.nn.Module, level: str, channels: Sequence[int], split: str) -> np.ndarray:
    """``[N, len(channels), h, w]``: the chosen channels of ``level`` over ``split`` at full resolution (live)."""
    extractor = FrozenModule(FeatureMapExtractor(model, [level_info(an, level)]))
    dataset = ImageClassificationDataset(an.ctx.data.splits[split], build_eval_transform(an.ctx.data_config))
    out = []
    with torch.no_grad():
        for images, *_ in DataLoader(dataset, batch_size=32):
            out.append(extractor(images)[level][:, list(channels)].float().numpy())
    return np.concatenate(out)


def patch_rows(
    an: Analysis, model: torch.nn.Module, level: str, channels: Sequence[int], k: int, split: str = "train"
) -> tuple[dict[str, np.ndarray], dict[str, list[str]], str]:
    """Per channel, the ``k`` patches of ``split`` that excite it most (cropped at the measured receptive field),
    and where the maps came from: the cache when it holds the level at its own resolution, else a live pass."""
    info = level_info(an, level)
    size = tuple(an.ctx.data_config["input_size"][1:])
    cached = an.caches[split].split
    native = (size[0] // info.reduction, size[1] // info.reduction)
    if tuple(cached.manifest["levels"][level]["shape"][1:]) == native:
        maps, source = np.asarray(cached.level(level))[:, list(channels)], "the cache (stored at full resolution)"
    else:
        maps, source = split_maps(an, model, level, channels, split), "a live pass (the cache holds pooled maps)"
    measured = receptive_fields(model, {level: info.index}, input_size=max(size))[level]
    # A field as large as the input (">=N"), or one the measurement could not see (0), is shown whole.
    rf = measured if isinstance(measured, int) and 0 < measured < max(size) else max(size)
    rows, titles = {}, {}
    for j, channel in enumerate(channels):
        patches = top_activating_patches(maps, j, k, rf, size)
        crops = []
        for p in patches:
            x0, y0, x1, y1 = p.box
            crop = torch.from_numpy(input_image(an, split, p.index)[y0:y1, x0:x1]).permute(2, 0, 1)[None]
            crops.append(F.interpolate(crop, size=(PATCH_PX, PATCH_PX), mode="bilinear")[0].permute(1, 2, 0).numpy())
        rows[f"{level} ch {channel}"] = np.stack(crops)
        titles[f"{level} ch {channel}"] = [f"#{p.index}: {p.activation:.2f}" for p in patches]
    if rf == measured:
        field = f"receptive field {rf} px"
    else:
        field = "whole image (" + (f"receptive field {measured} px" if measured else "field not measurable") + ")"
    return rows, titles, f"{source}; patches: {field}"
