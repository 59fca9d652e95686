"""Side-by-side measurements behind ``make bench``: each figure is a ratio of two timings taken in the same run."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from fmtransfer.backbone import PRE_LOGITS, FeatureMapExtractor, FrozenModule, build_eval_transform, build_suffix
from fmtransfer.cache import (
    DTYPES,
    CacheSpec,
    FeatureCache,
    FeatureExtractionModule,
    FeatureMapWriter,
    extraction_manifest,
    map_shapes,
)
from fmtransfer.data import ImageClassificationDataset
from fmtransfer.regimes import HeadSettings, RunContext, fit_head
from fmtransfer.training import ImageDataModule, InPrecision


def run_config(cfg: DictConfig, cache_dir: Path, **overrides) -> DictConfig:
    """``cfg`` with the bench's cold cache dir and the given dotted overrides."""
    run = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # each run resolves its own dirs
    run.cache.dir = str(cache_dir)
    for key, value in overrides.items():
        OmegaConf.update(run, key, value, force_add=True)
    return run


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def eval_loader(ctx: RunContext, split: str, batch_size: int, pin_memory: bool = False) -> DataLoader:
    """Decoded, preprocessed images of ``split`` in order: the inputs extraction sees."""
    dataset = ImageClassificationDataset(ctx.data.splits[split], build_eval_transform(ctx.data_config))
    workers = ctx.cfg.data.num_workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)


AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def forward_images_per_second(model: nn.Module, loader: DataLoader, device: torch.device, precision: str) -> float:
    """Bare backbone forward throughput (inference mode) over ``loader``, input loading included, under the
    autocast that Lightning's ``precision`` setting gives extraction (none for 32-true)."""
    model.to(device).eval()
    dtype = AUTOCAST_DTYPES.get(str(precision))
    count = 0
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for images, *_ in loader:
            model(images.to(device, non_blocking=True))
            count += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def extraction_images_per_second(
    ctx: RunContext, model: nn.Module, spec: CacheSpec, cache_dir: Path, split: str
) -> tuple[float, Path]:
    """Throughput of a cold cache build (``Trainer.predict``, pooling, cast, memmap writes, checksums, publish)."""
    extractor = FeatureMapExtractor(model, list(spec.levels))
    start = time.perf_counter()
    result = ctx.cache_split(FeatureCache(cache_dir, ctx.cfg.cache.verify), split, spec, lambda: extractor)
    seconds = time.perf_counter() - start
    return len(ctx.data.splits[split]) / seconds, result.split.path


class PredecodedImages(Dataset):
    """A split decoded and preprocessed once into one tensor, served a batch at a time: what extraction costs when
    JPEG decoding is not the bottleneck (on a fast GPU it is, unless many loader workers decode in parallel)."""

    def __init__(self, loader: DataLoader):
        batches = [(images, labels) for images, labels, *_ in loader]
        self.images = torch.cat([b[0] for b in batches])
        self.labels = torch.cat([b[1] for b in batches])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices)
        return self.images[idx], self.labels[idx], idx


def _whole_batch(batch):
    return batch


def predecoded_loader(images: PredecodedImages, batch_size: int, pin_memory: bool) -> DataLoader:
    return DataLoader(images, batch_size=batch_size, collate_fn=_whole_batch, pin_memory=pin_memory)


def predecoded_extraction_images_per_second(
    loader: DataLoader, extractor: FeatureMapExtractor, spec: CacheSpec, cache_dir: Path, trainer_kwargs: dict
) -> float:
    """Extraction + cache write from pre-decoded inputs: the cache build's own pieces (``Trainer.predict`` of
    ``FeatureExtractionModule``, ``FeatureMapWriter`` into a ``CacheEntryWriter``, checksums, atomic publish), fed
    from memory instead of from image files."""
    dataset: PredecodedImages = loader.dataset
    n = len(dataset)
    shapes = map_shapes(extractor, spec, tuple(dataset.images.shape[1:]))
    writer = FeatureCache(cache_dir).writer("bench", "predecoded", "0")
    trainer = pl.Trainer(
        **{**trainer_kwargs, "devices": 1, "num_nodes": 1, "enable_progress_bar": False},
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[FeatureMapWriter(writer)],
    )
    start = time.perf_counter()
    writer.create(n, shapes, DTYPES[spec.dtype])
    trainer.predict(FeatureExtractionModule(extractor, spec), loader, return_predictions=False)
    seconds = time.perf_counter() - start
    writer.publish(extraction_manifest("0", {}, "predecoded", n, [], spec, shapes, seconds))
    return n / (time.perf_counter() - start)


def live_head_run(ctx: RunContext, model: nn.Module) -> dict:
    """The same head as the frozen regime's, with the frozen backbone run in every step (no cache): what
    Lightning's finetuning callbacks and the PyTorch transfer-learning tutorial do. Its feature normaliser is fitted
    on one live pass over the training images, timed as part of training."""
    cfg = ctx.cfg
    head_cfg = HeadSettings(**ctx.cfg.regime.head)
    # The backbone computes in the extraction's precision, as the cached side's maps were: the same features.
    frozen = FrozenModule(FeatureMapExtractor(model, [lv for lv in ctx.spec.levels if lv.name == PRE_LOGITS]))
    features = InPrecision(frozen, ctx.tools.precision.extraction)
    # Shuffled, without a dropped last batch: the same batches per epoch as the cached side's feature batches.
    datamodule = ImageDataModule(
        ctx.data.splits,
        ctx.data_config,
        head_cfg.batch_size,
        augment=None,
        num_workers=cfg.data.num_workers,
        drop_last_train=False,
    )
    in_order = eval_loader(ctx, "train", head_cfg.batch_size)
    start = time.perf_counter()
    with torch.inference_mode():
        train_features = torch.cat([features(images)[PRE_LOGITS] for images, *_ in in_order])
    normaliser_seconds = time.perf_counter() - start
    results = fit_head(
        head_cfg, ctx.tools, {PRE_LOGITS: train_features.clone()}, datamodule, ctx.data.num_classes, features=features
    )
    results["train_seconds"] = round(results["train_seconds"] + normaliser_seconds, 3)
    return results


def forward_flops(module: nn.Module, inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass, counted by PyTorch's FlopCounterMode (grouped convolutions counted correctly)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(inputs)
    return int(counter.get_total_flops())


def partial_flop_ratio(model: nn.Module, level, image_size: tuple[int, int, int]) -> dict:
    """FLOPs of a partial-regime step with the prefix run live over one with the prefix read from the cache: the
    speed-up a cached prefix can give at most (the prefix runs without gradients either way).

    A training step of the suffix is counted as 3x its forward (backward: gradients of inputs and weights), the
    usual rule; FlopCounterMode's own count of ``convolution_backward`` ignores groups and overstates depthwise
    convolutions about 45-fold.
    """
    prefix = FrozenModule(FeatureMapExtractor(model, [level]))
    suffix = build_suffix(model, level).eval()
    image = torch.randn(1, *image_size)
    with torch.no_grad():
        cached_input = prefix(image)[level.name]
    prefix_flops = forward_flops(prefix, image)
    suffix_step = 3 * forward_flops(suffix, cached_input)
    return {
        "prefix_forward_flops": prefix_flops,
        "suffix_train_step_flops": suffix_step,
        "flop_ratio": (prefix_flops + suffix_step) / suffix_step,
    }


def read_and_memcpy_gbps(entry: Path, repeats: int = 3) -> dict:
    """Reading a cache entry's level arrays into memory as head training does (``CachedSplit.load``; page cache warm,
    as right after extraction) vs a plain in-memory copy of the same bytes. Both write into buffers allocated once,
    so neither pays first-touch page faults and the figure compares the two read paths alone."""
    from fmtransfer.cache import CachedSplit

    split = CachedSplit(entry, FeatureCache.read_manifest(entry))
    buffers = {name: split.load(name) for name in split.level_names}  # also warms the page cache
    nbytes = sum(b.nbytes for b in buffers.values())
    read = best_seconds(lambda: [split.load(name, out) for name, out in buffers.items()], repeats)
    source = np.concatenate([b.reshape(-1).view(np.uint8) for b in buffers.values()])
    target = np.empty_like(source)
    np.copyto(target, source)
    copy = best_seconds(lambda: np.copyto(target, source), repeats)
    return {"bytes": int(nbytes), "read_gb_per_s": nbytes / read / 1e9, "memcpy_gb_per_s": nbytes / copy / 1e9}


def bytes_per_image(model: nn.Module, levels, image_size: tuple[int, int, int], pool_size: int) -> dict:
    """Disk bytes per image of each level for the cache settings a user chooses between."""
    settings = {
        "float32": CacheSpec(tuple(levels), "float32", "none"),
        "float16": CacheSpec(tuple(levels), "float16", "none"),
        f"float16_avg{pool_size}": CacheSpec(tuple(levels), "float16", "avg", pool_size),
        "float16_global": CacheSpec(tuple(levels), "float16", "global"),
    }
    extractor = FeatureMapExtractor(model, list(levels))
    out: dict[str, dict[str, int]] = {}
    for name, spec in settings.items():
        shapes = map_shapes(extractor, spec, image_size)
        itemsize = np.dtype(DTYPES[spec.dtype]).itemsize
        out[name] = {level: int(np.prod(shape)) * itemsize for level, shape in shapes.items()}
    return out
