"""Cached maps pooled to small spatial grids: the inputs of heads that see where in the image a feature fired.

A level pooled to a ``g x g`` grid is one input group, ``level@gxg`` (``g = 1``: the plain level name, the global
average every other head reads), of ``channels * g * g`` features laid out channel-major (``[C, g, g]`` flattened).
A grid finer than the map is left out (a 1x1 map has no 2x2 grid); vectors (``pre_logits``) only have ``g = 1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


def group_name(level: str, grid: int) -> str:
    """The input group of ``level`` pooled to ``grid x grid``."""
    return level if grid == 1 else f"{level}@{grid}x{grid}"


def parse_group(name: str) -> tuple[str, int]:
    """``(level, grid)`` of an input group's name."""
    level, _, grid = name.partition("@")
    return level, int(grid.split("x")[0]) if grid else 1


def _cell_bounds(size: int, cells: int) -> list[tuple[int, int]]:
    # adaptive_avg_pool2d's cells: [floor(i * size / cells), ceil((i + 1) * size / cells)).
    return [((i * size) // cells, -((-(i + 1) * size) // cells)) for i in range(cells)]


def grid_pool(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C * grid * grid]``: the mean over each cell of a ``grid x grid`` partition, the cells
    of ``adaptive_avg_pool2d``. Written with slices and means so that it exports to ONNX for any map size."""
    n, c, h, w = maps.shape
    if grid == 1:
        return maps.mean(dim=(2, 3))
    rows, cols = _cell_bounds(h, grid), _cell_bounds(w, grid)
    cells = [maps[:, :, r0:r1, c0:c1].mean(dim=(2, 3)) for r0, r1 in rows for c0, c1 in cols]
    return torch.stack(cells, dim=2).reshape(n, c * grid * grid)


def grids_for(shape: Sequence[int], grids: Sequence[int]) -> list[int]:
    """The grids a map of ``shape`` (``[N, C]`` or ``[N, C, H, W]``) has among ``grids``."""
    if len(shape) == 2:
        return [1] if 1 in grids else []
    return [g for g in grids if g <= min(shape[2], shape[3])]


def grid_features(maps: Mapping[str, torch.Tensor], grids: Sequence[int]) -> dict[str, torch.Tensor]:
    """Every level of ``maps`` pooled to each of its ``grids``: ``{group name: [N, features]}`` (float32)."""
    out = {}
    for level, x in maps.items():
        for grid in grids_for(x.shape, grids):
            out[group_name(level, grid)] = x.float() if x.ndim == 2 else grid_pool(x.float(), grid)
    return out


class GridPooling(nn.Module):
    """``{level: map}`` -> ``{group: features}``: the grid features a head reads, from maps as the cache holds them."""

    def __init__(self, grids: Sequence[int]):
        super().__init__()
        self.grids = [int(g) for g in grids]

    def forward(self, maps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return grid_features(maps, self.grids)
