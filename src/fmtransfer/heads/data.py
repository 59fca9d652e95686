"""Cached maps as head-training data: globally pooled once, held in memory, served a whole batch at a time."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fmtransfer.cache import CachedSplit

POOL_CHUNK = 4096


def pooled_level(split: CachedSplit, level: str) -> torch.Tensor:
    """One level as float32 ``[N, C]``: spatial maps are averaged over H, W in chunks (bounded memory)."""
    arr = split.level(level)
    if arr.ndim == 2:
        return torch.from_numpy(np.asarray(arr, dtype=np.float32))
    out = np.empty(arr.shape[:2], dtype=np.float32)
    for start in range(0, len(arr), POOL_CHUNK):
        out[start : start + POOL_CHUNK] = arr[start : start + POOL_CHUNK].astype(np.float32).mean(axis=(2, 3))
    return torch.from_numpy(out)


class PooledFeatureDataset(Dataset):
    """Pooled features of chosen levels and labels, all in memory; ``__getitems__`` returns whole batches."""

    def __init__(self, features: dict[str, torch.Tensor], labels: torch.Tensor):
        self.features = features
        self.labels = labels

    @classmethod
    def from_cache(cls, split: CachedSplit, levels: Sequence[str]) -> PooledFeatureDataset:
        feats = {name: pooled_level(split, name) for name in levels}
        return cls(feats, torch.from_numpy(split.labels()))

    @property
    def dims(self) -> dict[str, int]:
        return {k: int(v.shape[1]) for k, v in self.features.items()}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return {k: v[index] for k, v in self.features.items()}, self.labels[index]

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices)
        return {k: v[idx] for k, v in self.features.items()}, self.labels[idx]


def _whole_batch(batch):
    return batch


def feature_loader(dataset: PooledFeatureDataset, batch_size: int, shuffle: bool) -> DataLoader:
    """A DataLoader that indexes the in-memory tensors once per batch (no per-sample Python work)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=_whole_batch, num_workers=0)


class CachedMapDataset(Dataset):
    """Full-resolution cached maps of one level (kept float16 in memory), served as float32 batches."""

    def __init__(self, maps: torch.Tensor, labels: torch.Tensor):
        self.maps = maps
        self.labels = labels

    @classmethod
    def from_cache(cls, split: CachedSplit, level: str) -> CachedMapDataset:
        # A copy: the maps are read once into memory (float16), then every epoch indexes RAM, not the disk.
        return cls(torch.from_numpy(split.load(level)), torch.from_numpy(split.labels()))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.maps[index].float(), self.labels[index]

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices)
        return self.maps[idx].float(), self.labels[idx]
