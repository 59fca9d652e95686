"""Cached maps as head-training data: globally pooled once, held in memory, served a whole batch at a time.

Both datasets hold plain tensors, so a small one can be moved to the training device once (``to``) and batched
there by ``ResidentBatches``: no DataLoader, no per-step host-to-device copy.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fmtransfer.cache import CachedSplit
from fmtransfer.heads.grids import grid_features


def pooled_level(split: CachedSplit, level: str, rows: np.ndarray | None = None) -> torch.Tensor:
    """One level as float32 ``[N, C]`` (only ``rows``, sorted, when given): spatial maps are averaged over H, W
    chunk by chunk (``cache.read_chunk_mb``)."""
    shape = split.shape(level)
    keep = None if rows is None else np.zeros(shape[0], dtype=bool)
    if keep is not None:
        keep[rows] = True
    out = np.empty((shape[0] if keep is None else int(keep.sum()), shape[1]), dtype=np.float32)
    done = 0
    for start, chunk in split.chunks(level):
        if keep is not None:
            chunk = chunk[keep[start : start + len(chunk)]]
        out[done : done + len(chunk)] = _pooled(chunk).numpy()
        done += len(chunk)
    return torch.from_numpy(out)


def pooled_grids(split: CachedSplit, level: str, grids: Sequence[int]) -> dict[str, torch.Tensor]:
    """One level pooled to each of its ``grids`` (``heads.grids``), chunk by chunk (``cache.read_chunk_mb``)."""
    parts: dict[str, list[torch.Tensor]] = {}
    shape = split.shape(level)
    empty = [(0, np.empty((0, *shape[1:]), split.dtype(level)))]  # an empty split still gets its (empty) groups
    for _, chunk in split.chunks(level) if shape[0] else empty:
        for name, x in grid_features({level: torch.from_numpy(chunk.astype(np.float32))}, grids).items():
            parts.setdefault(name, []).append(x)
    return {name: torch.cat(xs) for name, xs in parts.items()}


class PooledFeatureDataset(Dataset):
    """Pooled features of chosen levels and labels, all in memory; ``__getitems__`` returns whole batches."""

    def __init__(self, features: dict[str, torch.Tensor], labels: torch.Tensor):
        self.features = features
        self.labels = labels

    @classmethod
    def from_cache(
        cls, split: CachedSplit, levels: Sequence[str], grids: Sequence[int] = (1,), rows: np.ndarray | None = None
    ) -> PooledFeatureDataset:
        """``levels`` globally pooled (``grids=(1,)``; only ``rows``, sorted, when given), or pooled to each of
        ``grids`` (keys: ``heads.grids``)."""
        if rows is not None and tuple(grids) != (1,):
            raise ValueError("a subset of rows is read for globally pooled levels only (grids=(1,))")
        if tuple(grids) == (1,):
            feats = {name: pooled_level(split, name, rows) for name in levels}
        else:
            feats = {k: v for name in levels for k, v in pooled_grids(split, name, grids).items()}
        labels = split.labels()
        return cls(feats, torch.from_numpy(labels if rows is None else labels[rows]))

    @property
    def dims(self) -> dict[str, int]:
        return {k: int(v.shape[1]) for k, v in self.features.items()}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return {k: v[index] for k, v in self.features.items()}, self.labels[index]

    def __getitems__(self, indices: list[int] | torch.Tensor):
        idx = torch.as_tensor(indices, device=self.labels.device)
        return {k: v[idx] for k, v in self.features.items()}, self.labels[idx]

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.features.values()) + self.labels.nbytes

    def to(self, device: torch.device | str) -> PooledFeatureDataset:
        """The same dataset with its tensors on ``device``."""
        return PooledFeatureDataset({k: v.to(device) for k, v in self.features.items()}, self.labels.to(device))


class PooledFeatureStream:
    """A cached split's levels globally pooled a chunk of rows at a time, on every pass, served as batches like
    ``PooledFeatureDataset``'s: for a split read once (the test split), whose features need not stay in memory.

    A chunk's maps, all levels together, take at most ``cache.read_chunk_mb`` (at least one batch of rows), so the
    memory a pass takes is bounded by that setting, not by the split. An iterable with ``__len__`` (batches), which
    Lightning accepts wherever it takes a DataLoader.
    """

    def __init__(self, split: CachedSplit, levels: Sequence[str], batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.split, self.levels, self.batch_size = split, list(levels), batch_size
        rows = int(split.read_chunk_mb * 2**20) // max(1, sum(split.row_bytes(n) for n in self.levels))
        self.chunk_rows = max(1, rows // batch_size) * batch_size  # whole batches: only the split's last is smaller

    def __len__(self) -> int:
        return math.ceil(self.split.num_samples / self.batch_size)

    def __iter__(self) -> Iterator:
        labels = torch.from_numpy(self.split.labels())
        n = self.split.num_samples
        for start in range(0, n, self.chunk_rows):
            stop = min(start + self.chunk_rows, n)
            pooled = {name: _pooled(self.split.read_rows(name, start, stop)) for name in self.levels}
            for b in range(0, stop - start, self.batch_size):
                yield (
                    {k: v[b : b + self.batch_size] for k, v in pooled.items()},
                    labels[start + b : start + b + self.batch_size],
                )


POOL_BLOCK_BYTES = 16 * 2**20  # the float32 copy pooling makes, a block of rows at a time


def _pooled(rows: np.ndarray) -> torch.Tensor:
    """Cached rows as float32 ``[N, C]``: spatial maps averaged over H, W, converted to float32 a block of rows at a
    time (each row's mean is the same whatever the block; a chunk's whole float32 copy would double its memory)."""
    if rows.ndim == 2:
        return torch.from_numpy(rows.astype(np.float32))
    out = np.empty(rows.shape[:2], dtype=np.float32)
    step = max(1, POOL_BLOCK_BYTES // (4 * int(np.prod(rows.shape[1:]))))
    for start in range(0, len(rows), step):
        out[start : start + step] = rows[start : start + step].astype(np.float32).mean(axis=(2, 3))
    return torch.from_numpy(out)


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

    def __getitems__(self, indices: list[int] | torch.Tensor):
        idx = torch.as_tensor(indices, device=self.labels.device)
        return self.maps[idx].float(), self.labels[idx]

    @property
    def nbytes(self) -> int:
        return self.maps.nbytes + self.labels.nbytes

    def to(self, device: torch.device | str) -> CachedMapDataset:
        """The same dataset with its tensors on ``device`` (the maps stay float16 there)."""
        return CachedMapDataset(self.maps.to(device), self.labels.to(device))


class AugmentedViewsDataset(Dataset):
    """``V`` cached augmented views of every training image's map (float16 in memory), served as float32 batches.

    Each time an image is served it comes as its next view, in an order drawn per image from ``seed``: a fresh view
    per image per epoch, every view once in ``V`` epochs, and the same sequence for the same seed.
    """

    def __init__(self, views: torch.Tensor, labels: torch.Tensor, seed: int = 0):
        self.views = views  # [V, N, ...]
        self.labels = labels
        generator = torch.Generator().manual_seed(seed)
        self.order = torch.argsort(torch.rand(len(labels), len(views), generator=generator), dim=1)
        self.served = torch.zeros(len(labels), dtype=torch.long)

    @classmethod
    def from_cache(cls, splits: Sequence[CachedSplit], level: str, seed: int = 0) -> AugmentedViewsDataset:
        labels = splits[0].labels()
        if any(not np.array_equal(s.labels(), labels) for s in splits[1:]):
            raise ValueError(f"the views {[str(s.path) for s in splits]} are not of the same images")
        views = np.empty((len(splits), *splits[0].shape(level)), dtype=splits[0].dtype(level))
        for v, split in enumerate(splits):
            split.load(level, out=views[v])
        return cls(torch.from_numpy(views), torch.from_numpy(labels), seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        maps, labels = self.__getitems__([index])
        return maps[0], labels[0]

    def __getitems__(self, indices: list[int] | torch.Tensor):
        idx = torch.as_tensor(indices, device=self.labels.device)
        view = self.order[idx, self.served[idx] % len(self.views)]
        self.served[idx] += 1
        return self.views[view, idx].float(), self.labels[idx]

    @property
    def nbytes(self) -> int:
        return self.views.nbytes + self.labels.nbytes

    def to(self, device: torch.device | str) -> AugmentedViewsDataset:
        """The same dataset, where it is in its views' sequence, with its tensors on ``device``."""
        out = copy.copy(self)
        out.views, out.labels = self.views.to(device), self.labels.to(device)
        out.order, out.served = self.order.to(device), self.served.to(device)
        return out


InMemoryDataset = PooledFeatureDataset | CachedMapDataset | AugmentedViewsDataset


def _whole_batch(batch):
    return batch


def feature_loader(
    dataset: InMemoryDataset, batch_size: int, shuffle: bool, drop_last: bool = False, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader that indexes the in-memory tensors once per batch (no per-sample Python work).

    ``pin_memory``: batches are copied into page-locked memory, so the copy to a GPU can overlap compute.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        collate_fn=_whole_batch,
        num_workers=0,
        pin_memory=pin_memory,
    )


class ResidentBatches:
    """Batches of an in-memory dataset already on the training device, sliced there step by step.

    For caches small enough to sit in device memory: the tensors cross to the device once, instead of once per step
    through a DataLoader. ``shuffle`` draws a new order every epoch from a generator seeded with ``seed`` (the same
    seed gives the same orders); ``drop_last`` leaves out a last, smaller batch, as a DataLoader's does. An iterable
    with ``__len__``, which Lightning accepts wherever it takes a DataLoader.
    """

    def __init__(
        self,
        dataset: InMemoryDataset,
        batch_size: int,
        shuffle: bool,
        device: torch.device | str,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.device = torch.device(device)
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator:
        n = len(self.dataset)
        # The permutation is drawn on the CPU (a seeded CPU generator works for every device) and moved once.
        order = torch.randperm(n, generator=self._generator) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self.dataset.__getitems__(order[start : start + self.batch_size])
