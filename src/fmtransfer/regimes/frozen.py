"""The frozen regime: cached feature maps of a frozen pretrained backbone -> a small head trained on them."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from fmtransfer.backbone import (
    BackboneSpec,
    FeatureMapExtractor,
    LevelInfo,
    build_eval_transform,
    describe_backbone,
    parse_levels,
    resolve_data_config,
)
from fmtransfer.cache import CacheResult, CacheSpec, FeatureCache, ensure_feature_cache
from fmtransfer.data import PreparedData, prepare_data
from fmtransfer.errors import ConfigError
from fmtransfer.heads import HeadClassifier, PooledFeatureDataset, build_head, feature_loader
from fmtransfer.metrics import METRIC_NAMES

SPLITS = ("train", "validation", "test")


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


def trainer_device_kwargs(cfg: DictConfig) -> dict:
    """Accelerator and precision from ``cfg.trainer`` (shared by extraction and head training)."""
    return {"accelerator": cfg.trainer.accelerator, "precision": cfg.trainer.precision}


def cache_features(
    cfg: DictConfig, data: PreparedData, spec: BackboneSpec, head_levels: list[LevelInfo]
) -> tuple[dict[str, CacheResult], dict]:
    """Make sure every split's maps are cached; the backbone is built (once) only if some split misses.

    The head's levels are always cached, on top of ``cache.levels``.
    """
    data_config = resolve_data_config(spec.pretrained_cfg, **preprocessing_overrides(cfg, data))
    transform = build_eval_transform(data_config)
    levels = parse_levels(_as_list(cfg.cache.levels), spec.levels)
    levels = sorted(set(levels) | set(head_levels), key=spec.levels.index)
    cache_spec = CacheSpec(tuple(levels), cfg.cache.dtype, cfg.cache.pool, cfg.cache.pool_size)
    cache = FeatureCache(cfg.cache.dir, cfg.cache.verify)
    built: dict = {}

    def build_extractor() -> FeatureMapExtractor:
        if "extractor" not in built:
            model, info = spec.create()
            built["weights"] = info
            built["extractor"] = FeatureMapExtractor(model, levels)
        return built["extractor"]

    results = {}
    for split in SPLITS:
        results[split] = ensure_feature_cache(
            cache,
            split,
            data.splits[split],
            data.class_names,
            spec.name,
            spec.weights.identity(),
            data_config,
            transform,
            cache_spec,
            build_extractor,
            trainer_kwargs={**trainer_device_kwargs(cfg), "enable_progress_bar": cfg.trainer.progress_bar},
            batch_size=cfg.cache.batch_size,
            num_workers=cfg.data.num_workers,
            extra_manifest={"weights": spec.weights.label, "split_source": data.split_source[split]},
        )
    return results, data_config


def train_head(
    cfg: DictConfig,
    caches: dict[str, CacheResult],
    head_levels: list[str],
    num_classes: int,
    run_dir: Path,
    callbacks: Sequence[pl.Callback] = (),
) -> dict:
    """Fit the head on cached train maps, select on validation, evaluate test once; returns val/test metrics.

    With a ``checkpoints/last.ckpt`` in ``run_dir`` from an interrupted run, training resumes from it.
    """
    sets = {s: PooledFeatureDataset.from_cache(caches[s].split, head_levels) for s in SPLITS}
    head = build_head(cfg.head.name, sets["train"].dims, num_classes, **OmegaConf.to_container(cfg.head.options))
    head.normalizer.fit(sets["train"].features)
    module = HeadClassifier(
        head,
        num_classes,
        lr=cfg.head.lr,
        weight_decay=cfg.head.weight_decay,
        max_epochs=cfg.head.epochs,
        label_smoothing=cfg.head.label_smoothing,
    )
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=cfg.head.monitor,
        mode=cfg.head.monitor_mode,
        save_top_k=1,
        save_last=True,  # an interrupted run resumes from here
    )
    trainer = pl.Trainer(
        **trainer_device_kwargs(cfg),
        devices=1,
        max_epochs=cfg.head.epochs,
        deterministic=cfg.trainer.deterministic,
        logger=CSVLogger(run_dir, name="csv", version=""),
        callbacks=[checkpoint, *callbacks],
        enable_model_summary=False,
        log_every_n_steps=1,
        enable_progress_bar=False,  # head training takes seconds: a per-epoch bar would only flood the log
    )
    bs = cfg.head.batch_size
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        print(f"[train] resuming from {last}")
    trainer.fit(
        module,
        feature_loader(sets["train"], bs, shuffle=True),
        feature_loader(sets["validation"], bs, False),
        ckpt_path=str(last) if last.is_file() else None,
    )
    # Model selection used validation only; the test split is evaluated once, with the selected checkpoint.
    val = trainer.validate(module, feature_loader(sets["validation"], bs, False), ckpt_path="best", verbose=False)[0]
    test = trainer.test(module, feature_loader(sets["test"], bs, False), ckpt_path="best", verbose=False)[0]
    return {
        "val": {m: round(float(val[f"val/{m}"]), 6) for m in METRIC_NAMES},
        "test": {m: round(float(test[f"test/{m}"]), 6) for m in METRIC_NAMES},
        "best_checkpoint": str(checkpoint.best_model_path),
        "trainable_params": sum(p.numel() for p in head.parameters() if p.requires_grad),
        "device": str(trainer.strategy.root_device),
    }


def run_frozen(cfg: DictConfig, run_dir: Path, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """The whole frozen regime; writes ``metrics.json`` and the resolved config into ``run_dir``.

    Run again on the same ``run_dir`` (``make train ARGS="resume=<run dir>"``) to resume an interrupted run.
    """
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = load_data(cfg)
    for note in data.notes:
        print(f"[data] {note}")
    print(f"[data] {data.source.description}: {data.sizes()} images, {data.num_classes} classes")
    spec = describe_backbone(cfg.backbone.name, cfg.backbone.weights, cfg.backbone.checkpoint)
    head_levels = parse_levels(_as_list(cfg.head.levels), spec.levels)
    caches, data_config = cache_features(cfg, data, spec, head_levels)
    hit = all(c.hit for c in caches.values())
    print(f"[cache] {'hit: reusing' if hit else 'built'} {caches['train'].split.path.parent}")
    t_train = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    results = train_head(cfg, caches, [lv.name for lv in head_levels], data.num_classes, run_dir, callbacks)
    train_seconds = time.perf_counter() - t_train
    metrics = {
        "regime": "frozen",
        "test": results["test"],
        "val": results["val"],
        "cache": {
            "hit": hit,
            "dir": str(caches["train"].split.path.parent),
            "entries": {s: str(c.split.path) for s, c in caches.items()},
            "hits": {s: c.hit for s, c in caches.items()},
            "extract_seconds": round(sum(c.extract_seconds for c in caches.values()), 3),
            "bytes_per_image": {n: r["bytes_per_image"] for n, r in caches["train"].split.manifest["levels"].items()},
        },
        "train_seconds": round(train_seconds, 3),
        "total_seconds": round(time.perf_counter() - start, 3),
        "split_source": data.split_source,
        "split_sizes": data.sizes(),
        "skipped_images": [asdict(b) for b in data.skipped],
        "class_names": data.class_names,
        "backbone": {"name": spec.name, "weights": spec.weights.label, "weights_identity": spec.weights.identity()},
        "image_size": list(data_config["input_size"]),
        "head": {
            "name": cfg.head.name,
            "levels": [lv.name for lv in head_levels],
            "trainable_params": results["trainable_params"],
        },
        "seed": cfg.seed,
        "best_checkpoint": results["best_checkpoint"],
        "device": results["device"],
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _as_list(spec):
    return spec if isinstance(spec, (str, int)) else list(spec)
