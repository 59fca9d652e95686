"""What every regime shares: fit -> select the checkpoint on validation -> test once, with time and memory measured."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from fmtransfer.backbone import (
    BackboneSpec,
    FeatureMapExtractor,
    LevelInfo,
    build_eval_transform,
    describe_backbone,
    resolve_data_config,
)
from fmtransfer.cache import CacheResult, CacheSpec, FeatureCache, ensure_feature_cache
from fmtransfer.data import PreparedData, prepare_data
from fmtransfer.errors import ConfigError
from fmtransfer.heads import HeadClassifier
from fmtransfer.metrics import METRIC_NAMES
from fmtransfer.regimes.placement import channels_last, uses_cuda

SPLITS = ("train", "validation", "test")


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak on GPU, else peak process RSS above the start.

    RSS is sampled every 20 ms from /proc (no extra dependency); the number says which one it is.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.peak_bytes = 0
        self.kind = "gpu_max_allocated" if self.cuda else "cpu_rss_increase"
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            release_free_memory()
            self._start = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes() - self._start)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak_bytes = int(torch.cuda.max_memory_allocated())
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes() - self._start)


def release_free_memory() -> None:
    """Hand memory freed by earlier work back to the OS, so an RSS increase measures this block's own allocations.

    Without it, glibc keeps freed heap pages and reuses them: a run after a bigger one in the same process (a
    comparison's later runs) would show almost no increase. ``malloc_trim`` exists in glibc only; elsewhere this
    is a no-op and the figure stays an underestimate.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class EpochTimer(pl.Callback):
    """Wall time of each training epoch (validation excluded)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._t: float | None = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        # A run resumed from a checkpoint saved after an epoch's last step starts at that epoch's end: not timed.
        if self._t is not None:
            self.seconds.append(time.perf_counter() - self._t)
        self._t = None


def reseed(cfg: DictConfig) -> None:
    """Seed everything again just before something random is built or trained, so a run's numbers do not depend on
    what ran before it in the process (e.g. whether the cache missed and a backbone was built)."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)


def _to_device(x, device):
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def validation_loss(module: HeadClassifier, loader: DataLoader, device: torch.device) -> float:
    """Mean cross-entropy of ``module`` as it is now (module modes are restored afterwards)."""
    modes = {m: m.training for m in module.modules()}
    module.to(device).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            logits = module(_to_device(batch[0], device))
            total += float(torch.nn.functional.cross_entropy(logits, batch[1].to(device), reduction="sum"))
            count += len(batch[1])
    for m, training in modes.items():
        m.training = training
    return total / max(count, 1)


def epochs_for(num_train: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """``epochs``, raised so training takes at least ``min_steps`` optimiser steps (k-shot sets are one batch)."""
    steps_per_epoch = max(1, -(-num_train // batch_size))
    return max(epochs, -(-min_steps // steps_per_epoch))


def validation_interval(epochs: int, validations_per_run: int) -> int:
    """Epochs between validations so that a run validates about ``validations_per_run`` times.

    A few-shot run has many one-step epochs; validating a large validation split after each of them would cost far
    more than training, while a score every few epochs is plenty to pick the checkpoint.
    """
    if int(validations_per_run) < 1:
        raise ConfigError(f"trainer.validations_per_run={validations_per_run} must be at least 1.")
    return max(1, epochs // int(validations_per_run))


def trainer_device_kwargs(cfg: DictConfig) -> dict:
    """Accelerator, precision and processes (devices x nodes, strategy) from ``cfg.trainer``: extraction and
    training share them. More than one process runs Lightning DDP (gloo on CPU, NCCL on GPUs)."""
    t = cfg.trainer
    return {
        "accelerator": t.accelerator,
        "precision": t.precision,
        "devices": t.get("devices", 1),
        "num_nodes": t.get("num_nodes", 1),
        "strategy": t.get("strategy", "auto"),
    }


def evaluate_each_sample_once(loader: DataLoader, trainer: pl.Trainer) -> DataLoader:
    """``loader`` split across the trainer's processes without padding: under DDP, Lightning's default sampler repeats
    samples to even out the ranks, which would count them twice in validation and test metrics."""
    if trainer.world_size == 1:
        return loader
    sampler = UnrepeatedDistributedSampler(
        loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        persistent_workers=loader.persistent_workers,
    )


def fit_and_evaluate(
    cfg: DictConfig,
    module: HeadClassifier,
    loaders: dict[str, Iterable],
    run_dir: Path,
    epochs: int,
    monitor: str = "val/loss",
    monitor_mode: str = "min",
    callbacks: Sequence[pl.Callback] = (),
    include_initial: bool = True,
) -> dict:
    """Train ``module``; pick the checkpoint on validation; evaluate the test split once, with that checkpoint.

    A ``checkpoints/last.ckpt`` in ``run_dir`` from an interrupted run is resumed from.
    """
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor=monitor, mode=monitor_mode, save_top_k=1
    )
    # last.ckpt: the resume point, written after the first training step that ends ``trainer.checkpoint_every_s``
    # seconds or more after the previous save (0: every step). Time-based: saving a backbone with its optimiser
    # state (lite0: ~40 MB) every epoch cost ~20% of the short epochs of small datasets.
    # (Lightning 2.6's save_last only writes alongside a top-k save, so keep the latest as a top-1 of its own.)
    last_epoch = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="last",
        monitor=None,
        save_top_k=1,
        train_time_interval=timedelta(seconds=float(cfg.trainer.get("checkpoint_every_s", 60))),
        enable_version_counter=False,
    )
    timer = EpochTimer()
    trainer = pl.Trainer(
        **trainer_device_kwargs(cfg),
        max_epochs=epochs,
        check_val_every_n_epoch=validation_interval(epochs, cfg.trainer.get("validations_per_run", 20)),
        deterministic=cfg.trainer.deterministic,
        logger=CSVLogger(run_dir, name="csv", version=""),
        callbacks=[checkpoint, last_epoch, timer, *callbacks],
        enable_model_summary=False,
        log_every_n_steps=1,
        enable_progress_bar=False,  # runs of seconds to minutes: a per-step bar would only flood the log
    )
    loaders = {
        "train": loaders["train"],
        **{s: evaluate_each_sample_once(loaders[s], trainer) for s in ("validation", "test")},
    }
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        print(f"[train] resuming from {last}")
    device = str(trainer.strategy.root_device)
    # The starting point competes in model selection too (early stopping that includes step 0): a run that starts
    # from a fitted probe (LP-FT, partial) keeps it when no epoch of fine-tuning improves the validation loss.
    initial = None
    if include_initial and monitor == "val/loss" and not last.is_file():
        initial = (
            validation_loss(module, loaders["validation"], trainer.strategy.root_device),
            {k: v.detach().clone() for k, v in module.state_dict().items()},
        )
    reseed(cfg)
    start = time.perf_counter()
    with PeakMemory(device) as memory:
        trainer.fit(module, loaders["train"], loaders["validation"], ckpt_path=str(last) if last.is_file() else None)
    train_seconds = time.perf_counter() - start
    selected = "best epoch"
    best_path = str(checkpoint.best_model_path)
    if initial is not None and (checkpoint.best_model_score is None or initial[0] < float(checkpoint.best_model_score)):
        module.load_state_dict(initial[1])
        best_path = str(run_dir / "checkpoints" / "initial.ckpt")
        trainer.save_checkpoint(best_path)
        selected = "initial state (no epoch improved the validation loss)"
    # Model selection used validation only; the test split is evaluated once, with the selected weights.
    val = trainer.validate(module, loaders["validation"], ckpt_path=best_path, verbose=False)[0]
    test = trainer.test(module, loaders["test"], ckpt_path=best_path, verbose=False)[0]
    return {
        "val": {m: round(float(val[f"val/{m}"]), 6) for m in METRIC_NAMES},
        "test": {m: round(float(test[f"test/{m}"]), 6) for m in METRIC_NAMES},
        "test_confusion": module.test_confusion,
        "best_checkpoint": best_path,
        "selected": selected,
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "train_seconds": round(train_seconds, 3),
        "epochs": len(timer.seconds),
        "seconds_per_epoch": round(sum(timer.seconds) / max(1, len(timer.seconds)), 4),
        "peak_memory_bytes": int(memory.peak_bytes),
        "peak_memory_kind": memory.kind,
        "device": device,
    }


@dataclass
class RunContext:
    """Everything a regime needs that does not depend on the regime: config, splits, backbone, preprocessing."""

    cfg: DictConfig
    run_dir: Path
    data: PreparedData
    spec: BackboneSpec
    data_config: dict
    started: float

    def cache_splits(self, levels: Sequence[LevelInfo], cache_spec: CacheSpec) -> dict[str, CacheResult]:
        """Every split's maps for ``levels``, from the cache or extracted now (the backbone is built once, lazily)."""
        cache = FeatureCache(self.cfg.cache.dir, self.cfg.cache.verify)
        built: dict[str, FeatureMapExtractor] = {}

        def build_extractor() -> FeatureMapExtractor:
            if "extractor" not in built:
                built["extractor"] = FeatureMapExtractor(self.spec.create()[0], list(levels))
            return built["extractor"]

        results = {split: self.cache_split(cache, split, cache_spec, build_extractor) for split in SPLITS}
        hit = all(c.hit for c in results.values())
        print(f"[cache] {'hit: reusing' if hit else 'built'} {results['train'].split.path.parent}")
        return results

    def cache_split(
        self, cache: FeatureCache, split: str, cache_spec: CacheSpec, build_extractor: Callable[[], FeatureMapExtractor]
    ) -> CacheResult:
        """One split's maps in ``cache``, from it or extracted now by ``build_extractor()`` (called on a miss)."""
        cfg = self.cfg
        return ensure_feature_cache(
            cache,
            split,
            self.data.splits[split],
            self.data.class_names,
            self.spec.name,
            self.spec.weights.identity(),
            self.data_config,
            build_eval_transform(self.data_config),
            cache_spec,
            build_extractor,
            trainer_kwargs={**trainer_device_kwargs(cfg), "enable_progress_bar": cfg.trainer.progress_bar},
            batch_size=cfg.cache.batch_size,
            num_workers=cfg.data.num_workers,
            extra_manifest={"weights": self.spec.weights.label, "split_source": self.data.split_source[split]},
            channels_last=channels_last(cfg),
            pin_memory=uses_cuda(cfg),
        )

    def metrics(self, regime: str, results: dict, **extra) -> dict:
        """The run's ``metrics.json`` (written into the run dir), common fields first."""
        metrics = {
            "regime": regime,
            "test": results["test"],
            "val": results["val"],
            **extra,
            "train_seconds": results["train_seconds"],
            "seconds_per_epoch": results["seconds_per_epoch"],
            "epochs": results["epochs"],
            "trainable_params": results["trainable_params"],
            "peak_memory_bytes": results["peak_memory_bytes"],
            "peak_memory_kind": results["peak_memory_kind"],
            "total_seconds": round(time.perf_counter() - self.started, 3),
            "split_source": self.data.split_source,
            "split_sizes": self.data.sizes(),
            "shots_per_class": self.data.shots_per_class,
            "skipped_images": [asdict(b) for b in self.data.skipped],
            "class_names": self.data.class_names,
            "backbone": {
                "name": self.spec.name,
                "weights": self.spec.weights.label,
                "weights_identity": self.spec.weights.identity(),
            },
            "image_size": list(self.data_config["input_size"]),
            "seed": self.cfg.seed,
            "test_confusion": results["test_confusion"],
            "best_checkpoint": results["best_checkpoint"],
            "selected": results["selected"],
            "device": results["device"],
        }
        if rank_zero_only.rank == 0:  # under DDP every rank has the same (synchronised) numbers
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics


def start_run(cfg: DictConfig, run_dir: Path, weights: str | None = None, image_size: int | None = None) -> RunContext:
    """Save the resolved config, seed everything, prepare the splits and describe the backbone (no weights loaded)."""
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = load_data(cfg)
    for note in data.notes:
        print(f"[data] {note}")
    print(f"[data] {data.source.description}: {data.sizes()} images, {data.num_classes} classes")
    spec = describe_backbone(cfg.backbone.name, weights or cfg.backbone.weights, cfg.backbone.checkpoint)
    overrides = preprocessing_overrides(cfg, data)
    if image_size is not None:
        overrides["image_size"] = image_size
    data_config = resolve_data_config(spec.pretrained_cfg, **overrides)
    return RunContext(cfg, run_dir, data, spec, data_config, started)


def load_data(cfg: DictConfig) -> PreparedData:
    """The run's train/validation/test splits, as ``cfg.data`` describes them."""
    d = cfg.data
    return prepare_data(
        str(d.path),
        d.format,
        OmegaConf.to_container(d.rename_splits) if d.rename_splits else None,
        d.val_fraction,
        d.test_fraction,
        d.split_seed,
        d.shots_per_class,
        d.shots_seed,
        cache_dir=str(Path(cfg.paths.data_dir) / "hf"),
        skip_bad=cfg.data.skip_bad,
    )


def preprocessing_overrides(cfg: DictConfig, data: PreparedData) -> dict:
    """``data.image_size`` / ``data.crop_pct``: a value, or ``auto`` (the source's preference, else the backbone's)."""
    out = {}
    for key, kind in (("image_size", int), ("crop_pct", float)):
        value = cfg.data.get(key, "auto")
        if value in (None, "auto"):
            value = data.source.preferred_preprocessing.get(key)
        elif not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise ConfigError(f"data.{key}={value} must be a {kind.__name__} or 'auto'.")
        out[key] = value
    return out


def as_level_spec(spec):
    """A level spec from config (a string, an int, or a ListConfig) as a plain value or list."""
    return spec if isinstance(spec, (str, int)) else list(spec)
