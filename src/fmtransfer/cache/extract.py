"""Extract feature maps once with a frozen backbone (``Trainer.predict`` + a prediction writer) into the cache."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from datasets import Dataset
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from fmtransfer.backbone import FeatureMapExtractor, FrozenModule, LevelInfo, to_channels_last
from fmtransfer.backbone.tensor_transforms import JpegEval
from fmtransfer.cache.shards import ShardWriter, merge_shards, remove_shards, shard_root
from fmtransfer.cache.store import CachedSplit, CacheEntryWriter, FeatureCache, fingerprint_key, now_iso
from fmtransfer.data import ImageClassificationDataset, split_fingerprint
from fmtransfer.data.images import EncodedImages, collate_image_list
from fmtransfer.errors import CacheError, ConfigError

log = logging.getLogger(__name__)

POOL_MODES = ("none", "avg", "global")
DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class CacheSpec:
    """What to cache and how: chosen levels, storage dtype and spatial pooling."""

    levels: tuple[LevelInfo, ...]
    dtype: str = "float16"
    pool: str = "avg"
    pool_size: int = 8

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"cache.dtype={self.dtype} must be one of {list(DTYPES)}.")
        if self.pool not in POOL_MODES:
            raise ConfigError(f"cache.pool={self.pool} must be one of {list(POOL_MODES)}.")
        if self.pool == "avg" and self.pool_size < 1:
            raise ConfigError(f"cache.pool_size={self.pool_size} must be >= 1.")


def pool_map(x: torch.Tensor, pool: str, size: int) -> torch.Tensor:
    """Bound a feature map's size: ``avg`` averages down to at most size x size, ``global`` to a vector."""
    if x.ndim != 4 or pool == "none":
        return x
    if pool == "global":
        return x.mean(dim=(2, 3))
    h, w = x.shape[-2:]
    if h <= size and w <= size:
        return x
    return F.adaptive_avg_pool2d(x, (min(h, size), min(w, size)))


class FeatureExtractionModule(pl.LightningModule):
    """Frozen backbone in a LightningModule: ``predict_step`` returns the (pooled, cast) maps of a batch."""

    def __init__(self, extractor: FeatureMapExtractor, spec: CacheSpec, decode: JpegEval | None = None):
        super().__init__()
        self.extractor = FrozenModule(extractor)
        self.spec = spec
        self.decode = decode  # batches of encoded JPEGs, decoded and transformed here, on the model's device

    @property
    def dtype_stored(self) -> torch.dtype:
        return torch.float16 if self.spec.dtype == "float16" else torch.float32

    def pooled(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every level's map, pooled, in float32."""
        return {k: pool_map(v.float(), self.spec.pool, self.spec.pool_size) for k, v in self.extractor(images).items()}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.to(self.dtype_stored) for k, v in self.pooled(images).items()}

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if self.decode is None:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        encoded, labels, indices = batch  # torchvision reads encoded JPEGs from host memory, whatever the device
        return encoded, labels.to(device), indices.to(device)

    def predict_step(self, batch, batch_idx: int):
        images, labels, indices = batch
        if self.decode is not None:
            images = self.decode(images, self.device)
        maps = {k: checked_map(k, v, v.to(self.dtype_stored)) for k, v in self.pooled(images).items()}
        return {"maps": maps, "labels": labels, "indices": indices}


def checked_map(level: str, computed: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """``stored`` (``computed`` in the cache's dtype) if every value is finite; otherwise a ``CacheError`` naming the
    level and whether the backbone produced NaN/inf or the cast to float16 overflowed."""
    if bool(torch.isfinite(stored).all()):
        return stored
    if not bool(torch.isfinite(computed).all()):
        raise CacheError(
            f"level {level!r}: the backbone produced NaN or infinite values; check the images and the backbone's "
            f"weights (nothing was cached)."
        )
    peak = float(computed.abs().max())
    raise CacheError(
        f"level {level!r}: values up to {peak:.4g} overflow float16 (largest {torch.finfo(torch.float16).max:g}); "
        f"set cache.dtype=float32 (nothing was cached)."
    )


class FeatureMapWriter(BasePredictionWriter):
    """Writes each predicted batch into the cache entry at the samples' own indices, on a background thread, so the
    next batch's forward pass runs while this one is written. From a GPU, the maps are copied asynchronously into
    pinned host memory and the thread waits for that copy only. At most ``pending`` batches wait; a failed write
    is raised in the extracting thread (at the next batch, or when prediction ends)."""

    def __init__(self, writer: CacheEntryWriter, pending: int = 4):
        super().__init__(write_interval="batch")
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=pending)
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def _write_all(self) -> None:
        while (item := self.queue.get()) is not None:
            copied, indices, labels, maps = item
            if self.error is not None:
                continue  # drain: the extracting thread raises the first error
            try:
                if copied is not None:
                    copied.synchronize()
                self.writer.write(indices.numpy(), labels.numpy(), {k: v.numpy() for k, v in maps.items()})
            except BaseException as exc:
                self.error = exc

    def _raise_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def on_predict_start(self, trainer, pl_module):
        self.thread = threading.Thread(target=self._write_all, name="cache-writer", daemon=True)
        self.thread.start()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self._raise_failed()
        maps, copied = prediction["maps"], None
        if any(v.is_cuda for v in maps.values()):
            maps = {k: _pinned_copy(v) for k, v in maps.items()}
            copied = torch.cuda.Event()
            copied.record()
        else:
            maps = {k: v.cpu() for k, v in maps.items()}
        self.queue.put((copied, prediction["indices"].cpu(), prediction["labels"].cpu(), maps))

    def _finish(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None

    def on_predict_end(self, trainer, pl_module):
        self._finish()
        self._raise_failed()

    def on_exception(self, trainer, pl_module, exception):
        self._finish()


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (on a GPU) copied into new pinned host memory without waiting for the copy."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def map_shapes(extractor: FeatureMapExtractor, spec: CacheSpec, image_size: tuple[int, int, int]) -> dict:
    """Per-sample shape of every cached level, from one dummy forward pass."""
    module = FeatureExtractionModule(extractor, spec)
    # On the backbone's device: a model already moved to a GPU (the bench does) would reject a CPU probe.
    device = next(extractor.parameters()).device
    with torch.no_grad():
        out = module(torch.zeros(1, *image_size, device=device))
    return {k: tuple(v.shape[1:]) for k, v in out.items()}


@dataclass
class CacheResult:
    """The cache entry for one split and whether this call built it."""

    split: CachedSplit
    hit: bool
    extract_seconds: float


def cache_parts(
    backbone_name: str,
    weights_checksum: str,
    data_config: dict,
    transform_repr: str,
    split_name: str,
    split_hash: str,
    spec: CacheSpec,
    precision: str = "32-true",
) -> dict:
    """Everything that changes the cached features, as the fingerprint's parts (also stored in the manifest):
    a bf16 extraction's maps differ from an fp32 one's, and a timm release may change a model's layers."""
    return {
        "precision": str(precision),
        "timm": timm.__version__,
        "backbone": backbone_name,
        "weights_checksum": weights_checksum,
        "levels": [lv.name for lv in spec.levels],
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(data_config.items())},
        "transform": transform_repr,
        "split": split_name,
        "split_content": split_hash,
        "dtype": spec.dtype,
        "pool": spec.pool if spec.pool != "avg" else f"avg{spec.pool_size}",
    }


def ensure_feature_cache(
    cache: FeatureCache,
    split_name: str,
    split: Dataset,
    class_names: Sequence[str],
    backbone_name: str,
    weights_checksum: str,
    data_config: dict,
    transform,
    spec: CacheSpec,
    build_extractor,
    trainer_kwargs: dict | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    extra_manifest: dict | None = None,
    channels_last: bool = False,
    pin_memory: bool = False,
    gather: Callable[[], Sequence[RowSource]] | None = None,
) -> CacheResult:
    """Return the cached maps of ``split``, extracting them first if no complete entry matches.

    ``gather``, for a split made of rows of other splits (a cross-validation fold), returns where each row's maps
    already are; on a miss the entry is then assembled from those entries, not extracted.

    ``build_extractor`` is only called on a miss, so a cache hit never loads or runs the backbone. With a
    multi-process ``trainer_kwargs`` (``devices``/``num_nodes`` > 1: Lightning DDP) every rank extracts its part of
    the split into a shard and rank 0 merges the shards into the same entry a single process would write.
    ``channels_last`` runs the backbone in NHWC layout and ``pin_memory`` pins the image batches (both for GPUs).
    A ``JpegEval`` transform reads the files undecoded and decodes each batch on the model's device.
    """
    trainer_kwargs = {"devices": 1, "precision": "32-true", **(trainer_kwargs or {})}
    parts = cache_parts(
        backbone_name,
        weights_checksum,
        data_config,
        repr(transform),
        split_name,
        split_fingerprint(split),
        spec,
        trainer_kwargs["precision"],
    )
    names = [lv.name for lv in spec.levels]
    found = cache.find(backbone_name, split_name, parts, names)
    if found is not None:
        return CacheResult(found, hit=True, extract_seconds=0.0)
    key = fingerprint_key(parts)
    trainer = pl.Trainer(**trainer_kwargs, logger=False, enable_checkpointing=False, enable_model_summary=False)
    distributed = trainer.world_size > 1
    # Under DDP only rank 0 takes the entry's lock: the other ranks are its own workers (they start when it first
    # predicts), so they must not wait on it.
    lock = cache.lock(backbone_name, split_name, key) if trainer.global_rank == 0 else contextlib.nullcontext()
    with lock:
        if not distributed:
            found = cache.find(backbone_name, split_name, parts, names)  # built by another run while we waited
            if found is not None:
                return CacheResult(found, hit=True, extract_seconds=0.0)
        if trainer.global_rank == 0:
            cache.remove_partials(backbone_name, split_name, key)
        if gather is not None and not distributed:
            manifest = {"fingerprint": key, "parts": parts, "split": split_name, **(extra_manifest or {})}
            writer = cache.writer(backbone_name, split_name, key)
            return gather_entry(writer, manifest, len(split), class_names, gather())
        start = time.perf_counter()
        extractor: FeatureMapExtractor = build_extractor()
        shapes = map_shapes(extractor, spec, tuple(data_config["input_size"]))
        if channels_last:
            to_channels_last(extractor)
        final = cache.entry_dir(backbone_name, split_name, key)
        writer = cache.writer(backbone_name, split_name, key) if trainer.global_rank == 0 else None
        try:
            if writer is not None:
                writer.create(len(split), shapes, DTYPES[spec.dtype])
            shards = shard_root(final)
            trainer.callbacks.append(
                ShardWriter(shards, len(split), shapes, DTYPES[spec.dtype]) if distributed else FeatureMapWriter(writer)
            )
            encoded = isinstance(transform, JpegEval)  # decoded batch by batch on the model's device
            loader = DataLoader(
                EncodedImages(split) if encoded else ImageClassificationDataset(split, transform),
                batch_size=batch_size,
                shuffle=False,
                num_workers=num_workers,
                persistent_workers=False,
                pin_memory=pin_memory and not encoded,
                collate_fn=collate_image_list if encoded else None,
            )
            log.info(
                f"extracting {', '.join(names)} for {len(split)} '{split_name}' images"
                f"{f' with {trainer.world_size} processes' if distributed else ''} -> {final}"
            )
            module = FeatureExtractionModule(extractor, spec, transform if encoded else None)
            trainer.predict(module, loader, return_predictions=False)
            distribution = merge_shards(shards, trainer.world_size, writer) if distributed and writer else None
            seconds = time.perf_counter() - start
            if writer is not None:
                manifest = extraction_manifest(key, parts, split_name, len(split), class_names, spec, shapes, seconds)
                if distribution is not None:
                    manifest["distributed"] = distribution
                path = writer.publish({**manifest, **(extra_manifest or {})})
        except BaseException:
            if writer is not None:
                writer.abort()
                remove_shards(shard_root(final))
            raise
    if distributed:
        trainer.strategy.barrier("fmtransfer-cache-published")  # the other ranks read what rank 0 published
        if writer is not None:
            remove_shards(shards)
    if writer is not None:  # rank 0 / the only process: what it just published, without re-hashing it
        cache.evict(keep={path})
        return CacheResult(
            CachedSplit(path, FeatureCache.read_manifest(path), cache.read_chunk_mb), hit=False, extract_seconds=seconds
        )
    found = cache.find(backbone_name, split_name, parts, names)
    if found is None:
        raise CacheError(f"the cache entry {final} was not published (see rank 0's error).")
    return CacheResult(found, hit=False, extract_seconds=seconds)


FILE_KEYS = ("file", "file_bytes", "checksum")  # a level's file record, which publish writes anew


@dataclass(frozen=True)
class RowSource:
    """Rows ``source_rows`` of the cache entry ``entry`` go to rows ``rows`` of the entry being assembled."""

    entry: CachedSplit
    source_rows: np.ndarray
    rows: np.ndarray


def gather_entry(
    writer: CacheEntryWriter, manifest: dict, num_samples: int, class_names: Sequence[str], sources: Sequence[RowSource]
) -> CacheResult:
    """Publish an index view: an entry whose rows are rows of other entries (same backbone, levels and
    preprocessing), read from them when it is read; no map is copied.

    A source that is itself a view is looked through, so a view's rows always point at entries that hold maps. Its
    ``extract_seconds`` is the sources' extraction time in proportion to the rows taken: what extracting these images
    cost, so a run's cost does not depend on whether its maps were gathered or extracted.
    """
    start = time.perf_counter()
    plain: dict[Path, CachedSplit] = {}
    table = np.full((num_samples, 2), -1, dtype=np.int64)
    labels = np.full(num_samples, -1, dtype=np.int64)
    seconds = 0.0
    for src in sources:
        labels[src.rows] = src.entry.labels()[src.source_rows]
        seconds += (
            float(src.entry.manifest.get("extract_seconds") or 0.0) * len(src.rows) / max(1, src.entry.num_samples)
        )
        if src.entry.is_view:
            inner = src.entry.view_rows()[src.source_rows]
            pieces = [(entry, inner[:, 0] == k) for k, entry in enumerate(src.entry.sources())]
            pieces = [(entry, src.rows[m], inner[m, 1]) for entry, m in pieces]
        else:
            pieces = [(src.entry, src.rows, src.source_rows)]
        for entry, rows, source_rows in pieces:
            if entry.path.parent != writer.final.parent:
                raise CacheError(
                    f"a view's rows must come from entries beside it; {entry.path} is not in {writer.final.parent}."
                )
            table[rows, 0] = list(plain).index(entry.path) if entry.path in plain else len(plain)
            table[rows, 1] = source_rows
            plain.setdefault(entry.path, entry)
    if (table[:, 0] < 0).any():
        raise CacheError(f"{int((table[:, 0] < 0).sum())} of {num_samples} rows of {writer.final.name} have no source.")
    entries = list(plain.values())
    levels = {
        n: rec for n, rec in entries[0].manifest["levels"].items() if all(n in e.manifest["levels"] for e in entries)
    }
    try:
        writer.create_view(labels, table)
        path = writer.publish(
            {
                **manifest,
                "num_samples": num_samples,
                "class_names": list(class_names),
                "levels": {n: {k: v for k, v in rec.items() if k not in FILE_KEYS} for n, rec in levels.items()},
                "view": {
                    "sources": [e.path.name for e in entries],
                    "fingerprints": [e.manifest["fingerprint"] for e in entries],
                },
                "created": now_iso(),
                "extract_seconds": round(seconds, 3),
                "gather_seconds": round(time.perf_counter() - start, 3),
            }
        )
    except BaseException:
        writer.abort()
        raise
    return CacheResult(CachedSplit.open(path, entries[0].read_chunk_mb), hit=False, extract_seconds=0.0)


def extraction_manifest(
    key: str,
    parts: dict,
    split_name: str,
    num_samples: int,
    class_names: Sequence[str],
    spec: CacheSpec,
    shapes: dict,
    seconds: float,
) -> dict:
    """The manifest of a freshly extracted entry (file records are added by ``CacheEntryWriter.publish``)."""
    itemsize = np.dtype(DTYPES[spec.dtype]).itemsize
    return {
        "fingerprint": key,
        "parts": parts,
        "split": split_name,
        "num_samples": num_samples,
        "class_names": list(class_names),
        "levels": {
            lv.name: {
                **lv.as_dict(),
                "shape": list(shapes[lv.name]),
                "dtype": spec.dtype,
                "bytes_per_image": int(np.prod(shapes[lv.name])) * itemsize,
            }
            for lv in spec.levels
        },
        "created": now_iso(),
        "extract_seconds": round(seconds, 3),
    }
