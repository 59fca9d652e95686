"""What each cached level holds: shapes, per-channel statistics, sparsity, dead channels, class selectivity."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fmtransfer.cache import CachedSplit

CHUNK = 512


def shapes_table(split: CachedSplit, receptive_fields: dict[str, int | str] | None = None) -> list[dict]:
    """One row per cached level: channels, cached spatial size, stride, receptive field, bytes per image."""
    rows = []
    for name, rec in split.manifest["levels"].items():
        shape = rec["shape"]
        rows.append(
            {
                "level": name,
                "channels": shape[0],
                "spatial": "x".join(map(str, shape[1:])) if len(shape) == 3 else "pooled",
                "stride": rec.get("reduction"),
                "receptive_field": (receptive_fields or {}).get(name),
                "bytes_per_image": rec["bytes_per_image"],
                "dtype": rec["dtype"],
            }
        )
    return rows


def receptive_fields(model: nn.Module, level_indices: dict[str, int], input_size: int = 512) -> dict[str, int | str]:
    """Empirical receptive field (pixels) of a centre unit of each level: the extent of its non-zero input gradient.

    Weights are replaced by positive constants in a copy so no gradient cancels by chance; BatchNorm runs in eval.
    """
    import copy

    probe = copy.deepcopy(model).eval()
    with torch.no_grad():
        for module in probe.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
            for p in module.parameters(recurse=False):
                p.fill_(0.01)
    out = {}
    for name, index in level_indices.items():
        x = torch.zeros(1, 3, input_size, input_size, requires_grad=True)
        (fmap,) = probe.forward_intermediates(x, indices=[index], intermediates_only=True, stop_early=True)
        h, w = fmap.shape[-2:]
        fmap[0, :, h // 2, w // 2].sum().backward()
        nz = torch.nonzero(x.grad[0].abs().sum(0) > 0)
        extent = int((nz[:, 0].max() - nz[:, 0].min() + 1).item()) if len(nz) else 0
        # Reaching the whole input means the true field is at least that (larger inputs would tell more).
        out[name] = extent if extent < input_size else f">={input_size}"
    return out


def _chunks(arr: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(arr), CHUNK):
        yield np.asarray(arr[start : start + CHUNK], dtype=np.float32)


@dataclass
class LevelStatistics:
    """Per-channel statistics of one level over a dataset split."""

    level: str
    mean: np.ndarray  # [C]
    std: np.ndarray  # [C]
    sparsity: np.ndarray  # [C] fraction of values with |x| <= eps
    zero_fraction: np.ndarray  # [C] fraction of images on which the channel is (near) zero everywhere
    dead: np.ndarray  # [C] bool: zero_fraction >= dead_threshold
    selectivity: np.ndarray  # [C] class selectivity index in [0, 1]

    def summary(self) -> dict:
        return {
            "level": self.level,
            "channels": len(self.mean),
            "mean_sparsity": float(self.sparsity.mean()),
            "dead_channels": int(self.dead.sum()),
            "dead_fraction": float(self.dead.mean()),
            "mean_selectivity": float(self.selectivity.mean()),
        }


def level_statistics(
    maps: np.ndarray, labels: np.ndarray, level: str = "", eps: float = 1e-6, dead_threshold: float = 0.99
) -> LevelStatistics:
    """Statistics of ``maps`` ``[N, C, H, W]`` or ``[N, C]`` (read in chunks, so memory-mapped caches are fine).

    Sparsity is measured on the maps as cached: average pooling (``cache.pool=avg``) turns sparse maps denser, so
    cache with ``cache.pool=none`` to measure the network's own sparsity. A channel is *dead* when it is zero
    everywhere on at least ``dead_threshold`` of the images. Class selectivity follows Morcos et al. (2018):
    ``(mu_max - mu_rest) / (mu_max + mu_rest)`` over the class-conditional mean absolute activation.
    """
    n, c = maps.shape[:2]
    classes = np.unique(labels)
    total = np.zeros(c)
    total_sq = np.zeros(c)
    near_zero = np.zeros(c)
    image_zero = np.zeros(c)
    class_sum = np.zeros((len(classes), c))
    class_count = np.zeros(len(classes))
    values_per_image = int(np.prod(maps.shape[2:])) if maps.ndim > 2 else 1
    for start, chunk in zip(range(0, n, CHUNK), _chunks(maps), strict=True):
        flat = chunk.reshape(len(chunk), c, -1)
        total += flat.sum(axis=(0, 2))
        total_sq += (flat.astype(np.float64) ** 2).sum(axis=(0, 2))
        small = np.abs(flat) <= eps
        near_zero += small.sum(axis=(0, 2))
        image_zero += small.all(axis=2).sum(axis=0)
        per_image = np.abs(flat).mean(axis=2)
        lab = labels[start : start + len(chunk)]
        for k, cls in enumerate(classes):
            mask = lab == cls
            class_sum[k] += per_image[mask].sum(axis=0)
            class_count[k] += mask.sum()
    count = n * values_per_image
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    zero_fraction = image_zero / n
    class_mean = class_sum / np.maximum(class_count[:, None], 1)
    top = class_mean.max(axis=0)
    rest = (class_mean.sum(axis=0) - top) / max(len(classes) - 1, 1)
    selectivity = np.where(top + rest > 0, (top - rest) / np.maximum(top + rest, 1e-12), 0.0)
    return LevelStatistics(
        level, mean, std, near_zero / count, zero_fraction, zero_fraction >= dead_threshold, selectivity
    )


def all_level_statistics(split: CachedSplit, **kwargs) -> dict[str, LevelStatistics]:
    """``level_statistics`` for every level of a cache entry."""
    labels = split.labels()
    return {name: level_statistics(split.level(name), labels, name, **kwargs) for name in split.level_names}
