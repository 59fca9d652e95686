"""What every regime starts from: the run dir, the splits, the backbone's description and preprocessing, the
feature cache; and the ``metrics.json`` every run ends with."""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from fmtransfer.backbone import (
    BackboneSpec,
    FeatureMapExtractor,
    LevelInfo,
    SeededView,
    build_eval_transform,
    build_train_transform,
    describe_backbone,
    merge_augment,
    resolve_data_config,
)
from fmtransfer.backbone.tensor_transforms import JpegEval
from fmtransfer.cache import CacheResult, CacheSpec, FeatureCache, RowSource, ensure_feature_cache
from fmtransfer.data import CrossValidation, PreparedData, prepare_data
from fmtransfer.data.images import all_jpeg
from fmtransfer.data.leakage import write_pairs
from fmtransfer.errors import ConfigError
from fmtransfer.metrics import per_class_table
from fmtransfer.training import TrainingTools, epochs_for
from fmtransfer.training.datamodules import SPLITS

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Everything a regime needs that does not depend on the regime: config, splits, backbone, preprocessing, and
    the run's Trainer/callback/logger factories (``tools``)."""

    cfg: DictConfig
    run_dir: Path
    data: PreparedData
    spec: BackboneSpec
    data_config: dict
    tools: TrainingTools
    started: float
    setup_seconds: float = 0.0  # start_run: config, splits, backbone description
    # Build time of every cache entry this run read (train/validation), hit or not, by path: what it would cost a
    # user who ran only this regime (make compare's cost; a hit costs the run that built it, not this one).
    cache_build_seconds: dict[str, float] = field(default_factory=dict)
    # Wall time of this run's own steps outside fit_select_test: "cache" (finding, gathering or extracting maps),
    # "probe" (fitting a linear-probe start, or a head's feature selection). "probe" is part of what the model costs.
    phases: dict[str, float] = field(default_factory=dict)

    def add_phase(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def refit(self) -> bool:
        """Training on the whole labelled pool for a number of epochs chosen by cross-validation: no validation."""
        return bool(self.cfg.data.get("cv") and self.cfg.data.cv.refit)

    @property
    def keeps_start(self) -> bool:
        """A refit for the 0 epochs cross-validation chose: the run is its start and trains on nothing."""
        return self.refit and self.cfg.data.cv.get("epochs") == 0

    def planned_epochs(self, num_train: int, batch_size: int, epochs: int, min_steps: int) -> int:
        """The epochs to train: chosen by cross-validation when refitting (``data.cv.epochs``), else ``epochs``
        raised to ``min_steps``."""
        if self.refit and self.cfg.data.cv.epochs is not None:
            return int(self.cfg.data.cv.epochs)
        return epochs_for(num_train, batch_size, epochs, min_steps)

    def schedule_epochs(self, epochs: int) -> int:
        """The learning-rate schedule's horizon for a run of ``epochs`` epochs: a refit's is its folds' planned
        epochs (``data.cv.horizon``), so it runs each epoch at the learning rate the folds validated."""
        if self.refit and self.cfg.data.cv.get("horizon") is not None:
            return max(int(self.cfg.data.cv.horizon), epochs)
        return epochs

    @property
    def train_augment(self) -> dict:
        """The training images' augmentation, checked: ``data.augment`` with the run's regime's own ``augment``
        settings (those not null) over it. Every regime that trains on images, or on cached views of them, uses it."""
        shared = OmegaConf.to_container(self.cfg.data.get("augment") or {}, resolve=True)
        own = OmegaConf.to_container(self.cfg.get("regime", {}).get("augment") or {}, resolve=True)
        return merge_augment(shared, own)  # null: data.augment's

    def lazy_extractor(self, cache_spec: CacheSpec) -> Callable[[], FeatureMapExtractor]:
        """A builder of the backbone's extractor for ``cache_spec``'s levels that builds it on its first call only
        (a cache hit never loads the backbone)."""
        built: dict[str, FeatureMapExtractor] = {}

        def build_extractor() -> FeatureMapExtractor:
            if "extractor" not in built:
                built["extractor"] = FeatureMapExtractor(self.spec.create()[0], list(cache_spec.levels))
            return built["extractor"]

        return build_extractor

    def cache_spec(self, levels: Sequence[LevelInfo], pool: str | None = None) -> CacheSpec:
        """``cache.*`` settings for ``levels`` (``pool`` overrides ``cache.pool``, e.g. ``none`` for full maps)."""
        c = self.cfg.cache
        return CacheSpec(tuple(levels), c.dtype, pool or c.pool, c.pool_size)

    def cache_splits(self, cache_spec: CacheSpec, splits: Sequence[str] = SPLITS) -> dict[str, CacheResult]:
        """The maps of ``splits`` (default: every split) for ``cache_spec``, from the cache or extracted now
        (backbone built once, lazily)."""
        began = time.perf_counter()
        cache = FeatureCache.from_config(self.cfg.cache)
        build_extractor = self.lazy_extractor(cache_spec)
        results = {split: self.cache_split(cache, split, cache_spec, build_extractor) for split in splits}
        # The test split's extraction is evaluation, not the cost of a model; a refit's validation is its train.
        for split in ("train",) if self.refit else ("train", "validation"):
            if split in results:
                self.count_build(results[split])
        hit = all(c.hit for c in results.values())
        log.info(f"{'hit: reusing' if hit else 'built'} {next(iter(results.values())).split.path.parent}")
        self.add_phase("cache", time.perf_counter() - began)
        return results

    def count_build(self, result: CacheResult) -> None:
        """Count ``result``'s entry's build time among what this run's maps cost (``cache_build_seconds``)."""
        entry = result.split
        self.cache_build_seconds[str(entry.path)] = float(entry.manifest.get("extract_seconds") or 0.0)

    def cache_train_views(self, cache_spec: CacheSpec, views: int, seed: int) -> list[CacheResult]:
        """``views`` augmented views of the training split's maps (``data.augment``'s transform, view v of image i
        drawn from ``seed``, v and i alone): one cache entry per view, from the cache or extracted now.

        A view's draw depends on an image's row in the split it was extracted from, and a cross-validation split's
        views are gathered from the views of the splits its rows come from: every seed, fold, candidate and refit
        of a comparison trains on the same views.
        """
        began = time.perf_counter()
        cache = FeatureCache.from_config(self.cfg.cache)
        build_extractor = self.lazy_extractor(cache_spec)
        augment = build_train_transform(self.data_config, self.train_augment)
        results = [
            self.cache_split(cache, "train", cache_spec, build_extractor, SeededView(augment, v, views, seed))
            for v in range(views)
        ]
        for result in results:
            self.count_build(result)
        hit = all(r.hit for r in results)
        log.info(f"{'hit: reusing' if hit else 'built'} {views} augmented views of the training maps")
        self.add_phase("cache", time.perf_counter() - began)
        return results

    def cache_split(
        self,
        cache: FeatureCache,
        split: str,
        cache_spec: CacheSpec,
        build_extractor: Callable[[], FeatureMapExtractor],
        transform: Callable | None = None,
    ) -> CacheResult:
        """One split's maps in ``cache``, from it or extracted now by ``build_extractor()`` (called on a miss),
        through ``transform`` (None: the eval transform).

        A cross-validation split's maps are gathered from the entries of the splits its rows come from (those are
        the entries every other run of the comparison uses), never extracted again.
        """
        origin = self.data.origin.get(split)
        transform = transform or self.eval_transform(self.data.splits[split])

        def gather() -> list[RowSource]:
            names, rows = origin
            sources = []
            for base in dict.fromkeys(names):
                dataset = self.data.base_splits[base]
                entry = self.ensure_entry(cache, base, dataset, cache_spec, build_extractor, transform)
                mask = np.asarray([n == base for n in names])
                sources.append(RowSource(entry.split, rows[mask], np.flatnonzero(mask)))
            return sources

        return self.ensure_entry(
            cache, split, self.data.splits[split], cache_spec, build_extractor, transform, gather if origin else None
        )

    def eval_transform(self, split) -> Callable:
        """timm's evaluation transform, or its ``JpegEval`` (decoding on the GPU) per ``cache.decode``: ``auto``
        decodes on a CUDA GPU when every image of ``split`` is a JPEG; ``device`` always (any device; JPEGs only);
        ``pil`` never."""
        timm_eval = build_eval_transform(self.data_config)
        mode = str(self.cfg.cache.get("decode") or "pil")
        if mode not in ("auto", "device", "pil"):
            raise ConfigError(f"cache.decode={mode} must be auto, device or pil.")
        if mode == "device" and not all_jpeg(split):
            raise ConfigError(
                "cache.decode=device decodes JPEGs only, and this data has other images; use auto or pil."
            )
        on_device = mode == "device" or (mode == "auto" and self.tools.placement.cuda and all_jpeg(split))
        return JpegEval(timm_eval) if on_device else timm_eval

    def ensure_entry(
        self,
        cache: FeatureCache,
        split: str,
        dataset,
        cache_spec: CacheSpec,
        build_extractor: Callable[[], FeatureMapExtractor],
        transform: Callable,
        gather: Callable[[], list[RowSource]] | None = None,
    ) -> CacheResult:
        """``dataset``'s maps through ``transform`` under the split name ``split``: found, gathered, or extracted."""
        return ensure_feature_cache(
            cache,
            split,
            dataset,
            self.data.class_names,
            self.spec.name,
            self.spec.weights.identity(),
            self.data_config,
            transform,
            cache_spec,
            build_extractor,
            trainer_kwargs=self.tools.extraction_kwargs,
            batch_size=self.cfg.cache.batch_size,
            num_workers=self.cfg.data.num_workers,
            extra_manifest={"weights": self.spec.weights.label, "split_source": self.data.split_source[split]},
            channels_last=self.tools.placement.channels_last,
            pin_memory=self.tools.placement.cuda,
            gather=gather,
        )

    def leakage_record(self) -> dict | None:
        """``metrics.json``'s ``leakage``: pairs found before training (the CSV of them in the run dir), what
        ``data.dedupe`` dropped; None when the check is off."""
        report = self.data.leakage
        if report is None:
            return None
        pairs = None
        if report.pairs and rank_zero_only.rank == 0:
            write_pairs(self.run_dir / LEAKAGE_FILE, report)
            pairs = LEAKAGE_FILE
        return {
            **report.counts(),
            "pairs": pairs,
            "threshold": report.threshold,
            "dedupe": str(self.cfg.data.get("dedupe") or "off"),
            "dropped": report.dropped,
        }

    def metrics(self, regime: str, results: dict, **extra) -> dict:
        """The run's ``metrics.json`` (written into the run dir), common fields first."""
        metrics = {
            "regime": regime,
            "test": test_with_per_class(results, self.data.class_names),
            "val": results["val"],
            **extra,
            "train_seconds": results["train_seconds"],
            "seconds_per_epoch": results["seconds_per_epoch"],
            "seconds_per_validation": results.get("seconds_per_validation"),
            "epochs": results["epochs"],
            "trainable_params": results["trainable_params"],
            "peak_memory_bytes": results["peak_memory_bytes"],
            "peak_memory_kind": results["peak_memory_kind"],
            "total_seconds": round(total := time.perf_counter() - self.started, 3),
            "cache_build_seconds": round(sum(self.cache_build_seconds.values()), 3),
            # Where a run's wall time goes (a GPU run spent most of it outside training): the rest is caches, the
            # linear-probe start, models and Trainers being built.
            "phase_seconds": phase_seconds(
                total, self.setup_seconds, {**self.phases, **results.get("phase_seconds", {})}
            ),
            "probe_seconds": round(self.phases.get("probe", 0.0), 3),
            # The learning-rate schedule's horizon in epochs (a cross-validation fold's is its refit's horizon).
            "planned_epochs": results.get("planned_epochs"),
            "split_source": self.data.split_source,
            "split_sizes": self.data.sizes(),
            "shots_per_class": self.data.shots_per_class,
            "skipped_images": [asdict(b) for b in self.data.skipped],
            "leakage": self.leakage_record(),
            "class_names": self.data.class_names,
            "backbone": {
                "name": self.spec.name,
                "weights": self.spec.weights.label,
                "weights_identity": self.spec.weights.identity(),
            },
            "image_size": list(self.data_config["input_size"]),
            # The preprocessing, as make predict and make export apply it (timm's data config).
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()},
            "seed": self.seed,
            "test_confusion": results["test_confusion"],
            "start_test": results.get("start_test"),
            "best_checkpoint": results["best_checkpoint"],
            "selected": results["selected"],
            # Epochs trained when validation was best (0: the start was kept); cross-validation's refit epochs.
            "best_epoch": results.get("best_epoch"),
            "device": results["device"],
            "precision": {"training": results["precision"], "extraction": self.tools.precision.extraction},
            "channels_last": self.tools.placement.channels_last,
        }
        if rank_zero_only.rank == 0:  # under DDP every rank has the same (synchronised) numbers
            predictions = results.get("test_predictions")
            if predictions is not None:
                write_test_predictions(self.run_dir / PREDICTIONS_FILE, predictions, self.data.class_names)
                metrics["test_predictions"] = PREDICTIONS_FILE
            start = results.get("start_test_predictions")
            if start is not None:  # the starting weights on test, before training (a reference nothing chose by)
                write_test_predictions(self.run_dir / START_PREDICTIONS_FILE, start, self.data.class_names)
                metrics["start_test_predictions"] = START_PREDICTIONS_FILE
            curve = results.get("val_curve")
            if curve is not None:
                rows = self.data.validation_rows
                rows = np.arange(len(curve["labels"])) if rows is None else rows
                write_npz(self.run_dir / VAL_CURVE_FILE, rows=np.asarray(rows, dtype=np.int64), **curve)
                metrics["val_curve"] = VAL_CURVE_FILE
            # Last, and whole or not at all: a run dir with metrics.json is complete (make compare reuses it).
            tmp = self.run_dir / "metrics.json.tmp"
            tmp.write_text(json.dumps(metrics, indent=2))
            tmp.replace(self.run_dir / "metrics.json")
        return metrics


PREDICTIONS_FILE = "test_predictions.csv"
START_PREDICTIONS_FILE = "start_test_predictions.csv"
LEAKAGE_FILE = "leakage_pairs.csv"
# Per-image validation probabilities at every validated epoch (0: the start): epochs, probs, labels, rows (pool index).
VAL_CURVE_FILE = "val_predictions.npz"


def write_npz(path: Path, **arrays) -> None:
    """``np.savez`` through a temporary file: never a half-written file under the final name."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def test_with_per_class(results: dict, class_names: list[str]) -> dict:
    """``metrics.json``'s ``test``: the three metrics and ``per_class`` (precision, recall, F1, support per class)."""
    per_class = results.get("test_per_class")
    if not per_class:
        return results["test"]  # None for a cross-validation fold (not tested)
    return {**results["test"], "per_class": per_class_table(per_class, class_names)}


def phase_seconds(total: float, setup: float, fit_phases: dict[str, float]) -> dict[str, float]:
    """``{"setup", <fit_select_test's phases>, "other"}``, rounded, summing to ``total``."""
    phases = {"setup": setup, **fit_phases}
    phases["other"] = max(0.0, total - sum(phases.values()))
    return {k: round(v, 3) for k, v in phases.items()}


def write_test_predictions(path: Path, predictions: dict, class_names: list[str]) -> None:
    """``index,label,pred,prob_<class>...``: one row per test image, index = position in the test split (the same
    order for every run that shares the splits), label and pred as class names."""
    labels = predictions["label"].tolist()
    probs = predictions["prob"]
    preds = probs.argmax(-1).tolist()
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "label", "pred", *(f"prob_{c}" for c in class_names)])
        for i, (label, pred, row) in enumerate(zip(labels, preds, probs.tolist(), strict=True)):
            writer.writerow([i, class_names[label], class_names[pred], *(f"{p:.6f}" for p in row)])
    tmp.replace(path)


def start_run(
    cfg: DictConfig,
    run_dir: Path,
    tools: TrainingTools,
    weights: str | None = None,
    image_size: int | None = None,
) -> RunContext:
    """Save the resolved config, seed everything, prepare the splits and describe the backbone (no weights loaded)."""
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = load_data(cfg)
    for note in data.notes:
        (log.warning if note.startswith("warning") else log.info)(note.removeprefix("warning: "))
    log.info(f"{data.source.description}: {data.sizes()} images, {data.num_classes} classes")
    spec = describe_backbone(cfg.backbone.name, weights or cfg.backbone.weights, cfg.backbone.checkpoint)
    overrides = preprocessing_overrides(cfg, data)
    if image_size is not None:
        overrides["image_size"] = image_size
    data_config = resolve_data_config(spec.pretrained_cfg, **overrides)
    return RunContext(cfg, run_dir, data, spec, data_config, tools, started, time.perf_counter() - started)


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
        csv_columns=OmegaConf.to_container(d.csv_columns) if d.get("csv_columns") else None,
        cv=CrossValidation(**OmegaConf.to_container(d.cv)) if d.get("cv") else None,
        leakage_threshold=float(d.leakage.threshold) if d.get("leakage") and d.leakage.check else None,
        dedupe=str(d.get("dedupe") or "off"),
        leakage_index=str(d.leakage.get("index") or "auto") if d.get("leakage") else "auto",
    )


def preprocessing_overrides(cfg: DictConfig, data: PreparedData) -> dict:
    """``data.image_size`` / ``data.crop_pct``: a value, or ``auto`` (the source's preference, else the backbone's)."""
    out = {}
    for key, kind in (("image_size", int), ("crop_pct", float)):
        value = cfg.data[key]
        if value in (None, "auto"):
            value = data.source.preferred_preprocessing.get(key)
        elif not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise ConfigError(f"data.{key}={value} must be a {kind.__name__} or 'auto'.")
        out[key] = value
    return out


def as_level_spec(spec):
    """A level spec from config (a string, an int, or a ListConfig) as a plain value or list."""
    return spec if isinstance(spec, (str, int)) else list(spec)
