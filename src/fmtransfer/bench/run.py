"""``make bench``: the five figures of docs/benchmarks.md, each a ratio of two timings measured in this run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fmtransfer.backbone import parse_levels, split_level
from fmtransfer.bench.measure import (
    bytes_per_image,
    eval_loader,
    extraction_images_per_second,
    forward_images_per_second,
    live_head_run,
    partial_flop_ratio,
    read_and_memcpy_gbps,
)
from fmtransfer.cache import CacheSpec
from fmtransfer.regimes import REGIMES
from fmtransfer.regimes.common import as_level_spec, start_run
from fmtransfer.report.environment import describe_environment


def bench_device(cfg: DictConfig) -> torch.device:
    wants_gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def run_config(cfg: DictConfig, cache_dir: Path, **overrides) -> DictConfig:
    """``cfg`` with the bench's cold cache dir and the given dotted overrides."""
    run = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    run.cache.dir = str(cache_dir)
    for key, value in overrides.items():
        OmegaConf.update(run, key, value, force_add=True)
    return run


def run_bench(cfg: DictConfig, out_dir: Path) -> dict:
    """Measure everything, write ``bench.json`` into ``out_dir`` and return it."""
    b = cfg.bench
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = out_dir / "cache"  # cold: every cache build below is measured, none is reused from earlier runs
    ctx = start_run(cfg, out_dir / "context")
    device = bench_device(cfg)
    model, _ = ctx.spec.create()
    image_size = tuple(ctx.data_config["input_size"])
    levels = parse_levels(as_level_spec(cfg.cache.levels), ctx.spec.levels)
    spec = CacheSpec(tuple(levels), cfg.cache.dtype, cfg.cache.pool, cfg.cache.pool_size)
    batch = cfg.cache.batch_size
    print(f"[bench] {ctx.spec.name} at {image_size[1]} px on {device}, {ctx.data.sizes()} images")

    # 1. Extraction + cache write vs bare forward, same inputs, batch and device; alternated, fastest of each kept.
    loader = eval_loader(ctx, "train", batch)
    forward_ips, extract_ips, entry = 0.0, 0.0, None
    for attempt in range(b.rounds):
        forward_ips = max(forward_ips, forward_images_per_second(model, loader, device))
        folder = cache_dir / f"extract{attempt}"
        ips, entry = extraction_images_per_second(ctx, model, spec, folder, "train")
        extract_ips = max(extract_ips, ips)

    # 2. A head for E epochs: from the cache vs with the frozen backbone run in every step. Both validate on the same
    # schedule; the cached side pays for building its train and validation caches (cold), the live side for the
    # pass that fits the head's feature normaliser. The test split is evaluated once on either side, not timed.
    head_overrides = {"head.epochs": b.epochs, "head.min_steps": 0}
    cached = REGIMES["frozen"](run_config(cfg, cache_dir / "head", **head_overrides), out_dir / "head-cached")
    build = cached["cache"]["extract_seconds_by_split"]
    cached_seconds = build["train"] + build["validation"] + cached["train_seconds"]
    live_cfg = run_config(cfg, cache_dir / "head", **head_overrides)
    live = live_head_run(start_run(live_cfg, out_dir / "head-live"), model)

    # 3. partial: epoch time with the prefix read from the cache vs run live (no gradients).
    level = split_level(list(ctx.spec.levels), cfg.regimes.partial.k)
    partial_overrides = {"regimes.partial.epochs": b.partial_epochs, "regimes.partial.min_steps": 0}
    partial = {
        mode: REGIMES["partial"](
            run_config(cfg, cache_dir / "partial", **partial_overrides, **{"regimes.partial.live_prefix": live_prefix}),
            out_dir / f"partial-{mode}",
        )
        for mode, live_prefix in (("cached", False), ("live", True))
    }
    flops = partial_flop_ratio(model, level, image_size)

    # 4. Reading the cache into head-training memory vs memcpy; 5. bytes per image per level.
    read = read_and_memcpy_gbps(entry, b.repeats)
    sizes = bytes_per_image(model, ctx.spec.levels, image_size, cfg.cache.pool_size)

    speedup = live["train_seconds"] / cached_seconds
    partial_ratio = partial["live"]["seconds_per_epoch"] / partial["cached"]["seconds_per_epoch"]
    result = {
        "extract_over_forward": round(extract_ips / forward_ips, 3),
        f"cached_head_speedup_e{b.epochs}": round(speedup, 2),
        "partial_cached_over_live": round(partial_ratio, 3),
        "read_over_memcpy": round(read["read_gb_per_s"] / read["memcpy_gb_per_s"], 3),
        "bytes_per_image": sizes,
        "targets": {
            "extract_over_forward": 0.9,
            f"cached_head_speedup_e{b.epochs}": round(0.8 * b.epochs, 2),
            "partial_cached_over_live": round(0.8 * flops["flop_ratio"], 3),
            "read_over_memcpy": 0.5,
        },
        "timings": {
            "forward_images_per_s": round(forward_ips, 1),
            "extract_images_per_s": round(extract_ips, 1),
            "head": {
                "epochs": b.epochs,
                "cached_build_seconds": {"train": build["train"], "validation": build["validation"]},
                "cached_train_seconds": cached["train_seconds"],
                "cached_total_seconds": round(cached_seconds, 3),
                "live_total_seconds": live["train_seconds"],
                "cached_test_acc": cached["test"]["acc"],
                "live_test_acc": live["test"]["acc"],
                "cached_val_acc": cached["val"]["acc"],
                "live_val_acc": live["val"]["acc"],
            },
            "partial": {
                "split_level": level.name,
                "cached_seconds_per_epoch": partial["cached"]["seconds_per_epoch"],
                "live_seconds_per_epoch": partial["live"]["seconds_per_epoch"],
                **flops,
            },
            "read": read,
        },
        "setup": {
            "backbone": ctx.spec.name,
            "weights": ctx.spec.weights.label,
            "image_size": list(image_size),
            "batch_size": batch,
            "split_sizes": ctx.data.sizes(),
            "cache": {"dtype": cfg.cache.dtype, "pool": cfg.cache.pool, "levels": [lv.name for lv in levels]},
            "precision": cfg.trainer.precision,
        },
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "environment": describe_environment(Path(__file__).resolve().parents[3]),
    }
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    if not b.keep_cache:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return result


def bench_table(result: dict) -> str:
    """The figures, their targets and whether each is met, as a plain-text table."""
    rows = [("figure", "measured", "target", "met")]
    for key, target in result["targets"].items():
        rows.append((key, f"{result[key]}", f">= {target}", "yes" if result[key] >= target else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    t = result["timings"]
    lines += [
        "",
        f"forward {t['forward_images_per_s']} img/s, extraction + write {t['extract_images_per_s']} img/s",
        f"head x{t['head']['epochs']} epochs: cached {t['head']['cached_total_seconds']} s "
        f"(test acc {t['head']['cached_test_acc']:.4f}) vs live {t['head']['live_total_seconds']} s "
        f"(test acc {t['head']['live_test_acc']:.4f})",
        f"partial from {t['partial']['split_level']}: {t['partial']['cached_seconds_per_epoch']} s/epoch cached vs "
        f"{t['partial']['live_seconds_per_epoch']} s/epoch live, FLOP ratio {t['partial']['flop_ratio']:.2f}",
        f"cache read {t['read']['read_gb_per_s']:.2f} GB/s vs memcpy {t['read']['memcpy_gb_per_s']:.2f} GB/s",
        "bytes per image: "
        + "; ".join(f"{k} {sum(v.values()):,} (all levels)" for k, v in result["bytes_per_image"].items()),
        f"device: {result['device']}",
    ]
    return "\n".join(lines)
