"""The classic pictures of feature maps: activation maximisation (Erhan et al.; Olah et al., "Feature
Visualization"), the image patches that excite a channel most (Zeiler & Fergus), full-resolution maps of one photo
at every level, and the first layer's filters. Every function is deterministic for a given seed."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmtransfer.backbone import FeatureMapExtractor, FrozenModule, LevelInfo


def _normalise(mean: Sequence[float], std: Sequence[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return lambda x: (x - m) / s


def _blur(x: torch.Tensor) -> torch.Tensor:
    """A 3x3 binomial blur per channel: a cheap low-pass that keeps the optimised picture from high-frequency noise."""
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel, groups=3)


def maximise_channels(
    model: nn.Module,
    level: LevelInfo,
    channels: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    size: int = 96,
    steps: int = 96,
    lr: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Input images (``[len(channels), size, size, 3]`` in [0, 1]) that maximise each channel's mean activation at
    ``level``, optimised together as one batch by gradient ascent on the pixels.

    The usual regularisers: the pixels are a sigmoid of free parameters (always a valid image), every step sees a
    random jitter (roll of up to size/16 px) and scale (0.9-1.1), and every 8th step the picture is blurred. The
    backbone is frozen in eval mode. ``mean``/``std``: the backbone's input normalisation.
    """
    # A frozen copy in eval mode: gradients flow to the input only (FrozenModule would stop them altogether).
    extractor = FeatureMapExtractor(copy.deepcopy(model).eval().requires_grad_(False), [level])
    normalise = _normalise(mean, std)
    generator = torch.Generator().manual_seed(seed)
    n = len(channels)
    params = (torch.randn(n, 3, size, size, generator=generator) * 0.1).requires_grad_(True)
    optimizer = torch.optim.Adam([params], lr=lr)
    target = torch.as_tensor(list(channels))
    shift = max(1, size // 16)
    for step in range(steps):
        image = torch.sigmoid(params)
        dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=generator))
        scale = float(0.9 + 0.2 * torch.rand((), generator=generator))
        x = torch.roll(image, shifts=(dy, dx), dims=(2, 3))
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        maps = extractor(normalise(x))[level.name]
        activation = maps[torch.arange(n), target].mean(dim=(1, 2)) if maps.ndim == 4 else maps[torch.arange(n), target]
        optimizer.zero_grad()
        (-activation.sum()).backward()
        optimizer.step()
        if step % 8 == 7:
            with torch.no_grad():
                params.copy_(torch.logit(_blur(torch.sigmoid(params)).clamp(1e-4, 1 - 1e-4)))
    return torch.sigmoid(params).detach().permute(0, 2, 3, 1).numpy()


def channel_activations(model: nn.Module, level: LevelInfo, images: torch.Tensor) -> torch.Tensor:
    """``[N, C]``: each channel's spatial-mean activation at ``level`` for normalised ``images`` (no gradients)."""
    with torch.no_grad():
        maps = FrozenModule(FeatureMapExtractor(model, [level]))(images)[level.name]
    return maps.mean(dim=(2, 3)) if maps.ndim == 4 else maps


@dataclass(frozen=True)
class Patch:
    """Where a channel fired most in one image: the peak ``activation``, its unit ``(row, col)`` in the map and the
    input ``box`` ``(x0, y0, x1, y1)`` around it, one receptive field wide, clipped to the image."""

    index: int
    activation: float
    unit: tuple[int, int]
    box: tuple[int, int, int, int]


def top_activating_patches(
    maps: np.ndarray, channel: int, k: int, receptive_field: int, image_size: tuple[int, int]
) -> list[Patch]:
    """The ``k`` images whose ``channel`` peaks highest in ``maps`` (``[N, C, h, w]``, one split's maps of a level),
    most active first, each with the input box its peak unit sees. The map's grid is spread evenly over the
    ``image_size`` ``(height, width)`` input, so the maps must be at the level's own resolution (not pooled) for the
    box to sit where the unit looks."""
    channel_maps = np.asarray(maps[:, channel], dtype=np.float32)
    n, h, w = channel_maps.shape
    flat = channel_maps.reshape(n, -1)
    peaks = flat.max(axis=1)
    order = np.argsort(-peaks, kind="stable")[:k]
    height, width = image_size
    half = receptive_field / 2
    patches = []
    for i in order:
        row, col = divmod(int(flat[i].argmax()), w)
        cy, cx = (row + 0.5) * height / h, (col + 0.5) * width / w
        box = (
            int(max(0, round(cx - half))),
            int(max(0, round(cy - half))),
            int(min(width, round(cx + half))),
            int(min(height, round(cy + half))),
        )
        patches.append(Patch(int(i), float(peaks[i]), (row, col), box))
    return patches


def level_maps(model: nn.Module, levels: Sequence[LevelInfo], image: torch.Tensor) -> dict[str, np.ndarray]:
    """Full-resolution maps (``[C, h, w]``) of one normalised image (``[3, H, W]``) at every spatial level."""
    spatial = [lv for lv in levels if lv.index is not None]
    with torch.no_grad():
        out = FrozenModule(FeatureMapExtractor(model, spatial))(image[None])
    return {name: m[0].float().numpy() for name, m in out.items()}


def first_layer_filters(model: nn.Module) -> np.ndarray:
    """The first convolution's filters as colour patches ``[N, k, k, 3]``, each scaled to [0, 1] on its own."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3)
    w = conv.weight.detach().float().permute(0, 2, 3, 1).numpy()
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    hi = w.max(axis=(1, 2, 3), keepdims=True)
    return (w - lo) / np.maximum(hi - lo, 1e-12)
