"""partial on cached augmented views vs the prefix run live on freshly augmented images, at a photo dataset's size.

For each k in ``bench.partial_views.ks``, the partial regime trains its last k stages once per seed with the frozen
prefix's output read from the cache's augmented views (built once, by the first seed, and reused: the build time is
reported apart) and once per seed with the prefix run in every step. The figure is the live epoch time over the
cached one, against the same target as ``partial_cached_over_live`` (0.8 x the FLOP ratio); the test accuracy of
both sides, mean and standard deviation over the seeds, says whether the cached views train as good a model.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from fmtransfer.backbone import split_level
from fmtransfer.bench.measure import partial_flop_ratio, run_config
from fmtransfer.regimes import run_regime, with_regime

log = logging.getLogger(__name__)

MODES = {"cached_views": False, "live": True}  # mode -> regimes.partial.live_prefix


def views_config(cfg: DictConfig, cache_dir: Path, k: int, seed: int, live_prefix: bool) -> DictConfig:
    """The bench's config for one partial run: ``bench.partial_views.data`` over ``data``, the sizes below."""
    pv = cfg.bench.partial_views
    settings = {"k": k, "epochs": pv.epochs, "min_steps": 0, "live_prefix": live_prefix}
    run = run_config(cfg, cache_dir, seed=seed, **{f"regimes.partial.{key}": v for key, v in settings.items()})
    run.data = OmegaConf.merge(run.data, pv.data)
    return with_regime(run, "partial")


def seed_summary(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 4),
        "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "values": [round(v, 4) for v in values],
    }


def k_figures(cfg: DictConfig, out_dir: Path, cache_dir: Path, k: int, model: nn.Module, levels: list) -> dict:
    """Both modes over the seeds for one k: epoch times, the views' build time, test accuracy, the FLOP ratio
    (counted on ``model``, the bench's backbone, whose feature_info stages are ``levels``)."""
    seeds = list(cfg.bench.partial_views.seeds)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for seed in seeds:
        for mode, live_prefix in MODES.items():
            log.info(f"partial on views: k={k}, {mode}, seed {seed}")
            run_cfg = views_config(cfg, cache_dir, k, seed, live_prefix)
            runs[mode].append(run_regime(run_cfg, out_dir / f"k{k}-{mode}-seed{seed}"))
    level = split_level(levels, k)
    flops = partial_flop_ratio(model, level, tuple(runs["live"][0]["image_size"]))
    epoch = {mode: statistics.fmean(r["seconds_per_epoch"] for r in rs) for mode, rs in runs.items()}
    acc = {mode: seed_summary([r["test"]["acc"] for r in rs]) for mode, rs in runs.items()}
    gap = abs(acc["cached_views"]["mean"] - acc["live"]["mean"])
    one_image = 1 / runs["live"][0]["split_sizes"]["test"]
    return {
        "ratio": round(epoch["live"] / epoch["cached_views"], 3),
        "target": round(0.8 * flops["flop_ratio"], 3),
        "split_level": level.name,
        "views": runs["cached_views"][0]["partial"]["training_maps"],
        "seconds_per_epoch": {mode: round(s, 3) for mode, s in epoch.items()},
        # the first seed's cold build: the views of the training images and the validation and test maps
        "prefix_build_seconds": round(runs["cached_views"][0]["partial"]["prefix_extract_seconds"], 1),
        "test_acc": acc,
        # within the seeds' spread: the gap of the means is no larger than either side's seed-to-seed SD (or one
        # test image, when every seed scored the same)
        "acc_within_seed_spread": gap <= max(acc["cached_views"]["sd"], acc["live"]["sd"], one_image),
        **flops,
    }


def partial_views_figures(cfg: DictConfig, out_dir: Path, cache_dir: Path, model: nn.Module, levels: list) -> dict:
    """``k_figures`` for every k of ``bench.partial_views.ks`` on ``bench.partial_views.data``, or why not."""
    pv = cfg.bench.partial_views
    if not pv.ks or not pv.seeds:
        return {"skipped": "bench.partial_views.ks or .seeds is empty"}
    if not Path(str(pv.data.path)).is_dir():
        why = "is not a folder (the shared datasets are absent)"
        return {"skipped": f"bench.partial_views.data.path={pv.data.path} {why}"}
    return {
        "dataset": str(pv.data.path),
        "seeds": list(pv.seeds),
        "epochs": pv.epochs,
        "by_k": {
            str(k): k_figures(cfg, out_dir / "partial-views", cache_dir / "partial-views", k, model, levels)
            for k in pv.ks
        },
    }


def partial_views_lines(views: dict) -> list[str]:
    """The table's rows for the cached-views figure: per k, epoch times, the build, accuracy over seeds."""
    if "by_k" not in views:
        return [f"partial on cached views: not measured ({views.get('skipped', 'no result')})"] if views else []
    lines = [f"partial on cached views vs live prefix, {views['dataset']} ({len(views['seeds'])} seeds):"]
    for k, f in views["by_k"].items():
        s, a = f["seconds_per_epoch"], f["test_acc"]
        lines.append(
            f"  k={k} (from {f['split_level']}, {f['views']}): {s['cached_views']} vs {s['live']} s/epoch, prefix maps "
            f"built once in {f['prefix_build_seconds']} s; test acc {a['cached_views']['mean']:.3f} ± "
            f"{a['cached_views']['sd']:.3f} vs {a['live']['mean']:.3f} ± {a['live']['sd']:.3f} "
            f"({'within' if f['acc_within_seed_spread'] else 'NOT within'} the seeds' spread)"
        )
    return lines
