"""``make bench``: the figures of docs/benchmarks.md, each a ratio of two timings measured in this run."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fmtransfer.backbone import FeatureMapExtractor, parse_levels, split_level, to_channels_last
from fmtransfer.bench.fast_path import fast_path_figures
from fmtransfer.bench.measure import (
    PredecodedImages,
    bytes_per_image,
    eval_loader,
    extraction_images_per_second,
    forward_images_per_second,
    live_head_run,
    partial_flop_ratio,
    predecoded_extraction_images_per_second,
    predecoded_loader,
    read_and_memcpy_gbps,
    run_config,
)
from fmtransfer.bench.partial_views import partial_views_figures, partial_views_lines
from fmtransfer.cache import CacheSpec
from fmtransfer.regimes import for_run_dir, run_regime, start_run, with_regime
from fmtransfer.regimes.context import as_level_spec
from fmtransfer.report.environment import describe_environment
from fmtransfer.training import instantiate_training

log = logging.getLogger(__name__)


def h100_targets(device_name: str, backbone: str, image_size: tuple[int, ...]) -> dict:
    """The issue's absolute target, which only means something on the hardware and setting it names."""
    if "H100" in device_name and backbone == "tf_efficientnet_lite0" and image_size[-1] == 224:
        return {"extract_predecoded_images_per_s": 5000}
    return {}


def start_context(cfg: DictConfig, run_dir: Path):
    """A run's context (splits, backbone, preprocessing, Trainer settings) without running a regime."""
    cfg = for_run_dir(cfg, run_dir)
    return start_run(cfg, run_dir, instantiate_training(cfg))


def cpu_fast_path(cfg: DictConfig, out_dir: Path, cache_dir: Path, device: torch.device) -> dict:
    """``fast_path.fast_path_figures`` on ``bench.fast_path.data`` (hymenoptera's JPEGs by default), or why not."""
    f = cfg.bench.fast_path
    if device.type != "cpu":
        return {"skipped": f"the bench runs on {device.type}, not the CPU"}
    if not Path(str(f.data)).is_dir():
        return {"skipped": f"bench.fast_path.data={f.data} is not a folder (the shared datasets are absent)"}
    data = {"data.path": str(f.data), "data.image_size": f.image_size, "data.shots_per_class": None}
    fast_cfg = run_config(cfg, cache_dir / "fast", **data)
    ctx = start_context(fast_cfg, out_dir / "fast-path")
    model, _ = ctx.spec.create()
    log.info(f"CPU fast path: {f.data} at {ctx.data_config['input_size'][-1]} px")
    return fast_path_figures(ctx, model, cache_dir / "fast", f.train_steps, f.train_batch_size, cfg.bench.rounds)


def jpeg_extraction(cfg: DictConfig, out_dir: Path, cache_dir: Path) -> dict:
    """Extraction from JPEG files, images decoded by PIL in loader workers vs by torchvision where the model runs
    (nvJPEG on a GPU; ``cache.decode``), on ``bench.jpeg_extraction.data``'s training JPEGs repeated to at least
    ``images``, each after an untimed warm-up extraction of one batch; or why it was skipped."""
    from datasets import concatenate_datasets

    f = cfg.bench.jpeg_extraction
    if not Path(str(f.data)).is_dir():
        return {"skipped": f"bench.jpeg_extraction.data={f.data} is not a folder (the shared datasets are absent)"}
    data = {"data.path": str(f.data), "data.image_size": f.image_size, "data.shots_per_class": None}
    ctx = start_context(run_config(cfg, cache_dir / "jpeg", **data), out_dir / "jpeg")
    train = ctx.data.splits["train"]
    repeated = concatenate_datasets([train] * -(-int(f.images) // len(train)))
    model, _ = ctx.spec.create()
    spec = ctx.cache_spec([lv for lv in ctx.spec.levels if lv.name == "pre_logits"])
    figures = {}
    for mode in ("pil", "device"):
        OmegaConf.update(ctx.cfg, "cache.decode", mode)
        for name, split in (
            ("warm-up", train.select(range(min(len(train), int(cfg.cache.batch_size))))),
            ("timed", repeated),
        ):
            ctx.data.splits["train"] = split
            ips, _ = extraction_images_per_second(ctx, model, spec, cache_dir / f"jpeg-{mode}-{name}", "train")
        figures[f"{mode}_images_per_s"] = round(ips, 1)
    ctx.data.splits["train"] = train
    log.info(f"extraction from JPEG files: {figures}")
    return {
        **figures,
        "device_over_pil": round(figures["device_images_per_s"] / figures["pil_images_per_s"], 3),
        "images": len(repeated),
        "image_size": list(ctx.data_config["input_size"]),
    }


def run_bench(cfg: DictConfig, out_dir: Path) -> dict:
    """Measure everything, write ``bench.json`` into ``out_dir`` and return it."""
    b = cfg.bench
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = out_dir / "cache"  # cold: every cache build below is measured, none is reused from earlier runs
    ctx = start_context(cfg, out_dir / "context")
    placement = ctx.tools.placement
    device = placement.device or torch.device("cpu")
    model, _ = ctx.spec.create()
    other_layout_model = copy.deepcopy(model)  # for 1b, before the layout below changes ``model`` in place
    nhwc = placement.channels_last
    if nhwc:  # the bare forward runs in the layout extraction uses: same inputs, batch, device and layout
        to_channels_last(model)
    image_size = tuple(ctx.data_config["input_size"])
    levels = parse_levels(as_level_spec(cfg.cache.levels), ctx.spec.levels)
    spec = CacheSpec(tuple(levels), cfg.cache.dtype, cfg.cache.pool, cfg.cache.pool_size)
    batch = cfg.cache.batch_size
    log.info(f"{ctx.spec.name} at {image_size[1]} px on {device}, {ctx.data.sizes()} images")

    # 1. Extraction + cache write vs bare forward, same inputs, batch and device; alternated, fastest of each kept.
    loader = eval_loader(ctx, "train", batch, pin_memory=device.type == "cuda")
    forward_ips, extract_ips, entry = 0.0, 0.0, None
    for attempt in range(b.rounds):
        forward_ips = max(forward_ips, forward_images_per_second(model, loader, device, ctx.tools.precision.extraction))
        folder = cache_dir / f"extract{attempt}"
        ips, entry = extraction_images_per_second(ctx, model, spec, folder, "train")
        extract_ips = max(extract_ips, ips)
    # 1b. Extraction in the other memory layout (trainer.channels_last=auto picks NHWC on CUDA GPUs only).
    other_placement = dataclasses.replace(placement, channels_last=not nhwc)
    other_ctx = dataclasses.replace(ctx, tools=dataclasses.replace(ctx.tools, placement=other_placement))
    other_ips = max(
        extraction_images_per_second(other_ctx, other_layout_model, spec, cache_dir / f"layout{attempt}", "train")[0]
        for attempt in range(b.rounds)
    )
    layouts = {"nhwc" if nhwc else "nchw": extract_ips, "nchw" if nhwc else "nhwc": other_ips}
    # 1c. Both again from pre-decoded inputs (decoded and preprocessed once, in memory): the backbone and the cache
    # writes without JPEG decoding, which a fast GPU outruns. The H100 target (lite0, 224 px) is on this one.
    predecoded = predecoded_loader(PredecodedImages(loader), batch, pin_memory=device.type == "cuda")
    extractor = FeatureMapExtractor(model, list(spec.levels))
    pre_forward_ips, pre_extract_ips = 0.0, 0.0
    for attempt in range(b.rounds):
        pre_forward_ips = max(
            pre_forward_ips, forward_images_per_second(model, predecoded, device, ctx.tools.precision.extraction)
        )
        folder = cache_dir / f"predecoded{attempt}"
        ips = predecoded_extraction_images_per_second(predecoded, extractor, spec, folder, ctx.tools.extraction_kwargs)
        pre_extract_ips = max(pre_extract_ips, ips)

    # 2. A head for E epochs: from the cache vs with the frozen backbone run in every step. Both validate on the same
    # schedule; the cached side pays for building its train and validation caches (cold), the live side for the
    # pass that fits the head's feature normaliser. The test split is evaluated once on either side, not timed.
    head_overrides = {"head.epochs": b.epochs, "head.min_steps": 0}
    cached = run_regime(run_config(cfg, cache_dir / "head", **head_overrides), out_dir / "head-cached")
    build = cached["cache"]["extract_seconds_by_split"]
    cached_seconds = build["train"] + build["validation"] + cached["train_seconds"]
    live_cfg = run_config(cfg, cache_dir / "head", **head_overrides)
    live = live_head_run(start_context(live_cfg, out_dir / "head-live"), model)
    # 2b. The cached head's epochs with its in-memory features batched where they are (ResidentBatches, the default
    # within trainer.resident_data_mb) vs through a DataLoader; the cache is warm now, so this times training alone.
    loader_cfg = run_config(cfg, cache_dir / "head", **head_overrides, **{"trainer.resident_data_mb": 0})
    through_loader = run_regime(loader_cfg, out_dir / "head-cached-dataloader")

    # 3. partial: epoch time with the prefix read from the cache vs run live (no gradients).
    level = split_level(list(ctx.spec.levels), cfg.regimes.partial.k)
    partial_overrides = {"regimes.partial.epochs": b.partial_epochs, "regimes.partial.min_steps": 0}
    partial = {
        mode: run_regime(
            with_regime(
                run_config(
                    cfg, cache_dir / "partial", **partial_overrides, **{"regimes.partial.live_prefix": live_prefix}
                ),
                "partial",
            ),
            out_dir / f"partial-{mode}",
        )
        for mode, live_prefix in (("cached", False), ("live", True))
    }
    flops = partial_flop_ratio(model, level, image_size)

    # 4. Reading the cache into head-training memory vs memcpy; 5. bytes per image per level.
    read = read_and_memcpy_gbps(entry, b.repeats)
    sizes = bytes_per_image(model, ctx.spec.levels, image_size, cfg.cache.pool_size)

    # 6. The CPU fast path on a photo dataset's JPEGs at the backbone's own size.
    fast_path = cpu_fast_path(cfg, out_dir, cache_dir, device)
    # 7. partial on cached augmented views vs its prefix run live, at a photo dataset's own size, over seeds.
    views = partial_views_figures(cfg, out_dir, cache_dir, model, list(ctx.spec.levels))
    views_figures = {f"partial_views_cached_over_live_k{k}": f for k, f in views.get("by_k", {}).items()}

    # 8. Extraction from JPEG files: decoded by PIL in loader workers vs where the model runs.
    jpeg = jpeg_extraction(cfg, out_dir, cache_dir)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    speedup = live["train_seconds"] / cached_seconds
    partial_ratio = partial["live"]["seconds_per_epoch"] / partial["cached"]["seconds_per_epoch"]
    result = {
        "extract_over_forward": round(extract_ips / forward_ips, 3),
        "extract_over_forward_predecoded": round(pre_extract_ips / pre_forward_ips, 3),
        "extract_predecoded_images_per_s": round(pre_extract_ips, 1),
        f"cached_head_speedup_e{b.epochs}": round(speedup, 2),
        "partial_cached_over_live": round(partial_ratio, 3),
        "read_over_memcpy": round(read["read_gb_per_s"] / read["memcpy_gb_per_s"], 3),
        "bytes_per_image": sizes,
        # Without targets: what the GPU-minded defaults (channels_last=auto, resident batches) buy on this device.
        "extract_nhwc_over_nchw": round(layouts["nhwc"] / layouts["nchw"], 3),
        "resident_over_dataloader": round(through_loader["seconds_per_epoch"] / cached["seconds_per_epoch"], 3),
        "cpu_fast_path": fast_path,
        "jpeg_extraction": jpeg,
        "partial_views": views,
        **{key: f["ratio"] for key, f in views_figures.items()},
        "targets": {
            "extract_over_forward": 0.9,
            "extract_over_forward_predecoded": 0.9,
            f"cached_head_speedup_e{b.epochs}": round(0.8 * b.epochs, 2),
            "partial_cached_over_live": round(0.8 * flops["flop_ratio"], 3),
            "read_over_memcpy": 0.5,
            **{key: f["target"] for key, f in views_figures.items()},
            **h100_targets(device_name, ctx.spec.name, image_size),
        },
        "timings": {
            "forward_images_per_s": round(forward_ips, 1),
            "extract_images_per_s": round(extract_ips, 1),
            "extract_images_per_s_by_layout": {k: round(v, 1) for k, v in layouts.items()},
            "predecoded": {
                "forward_images_per_s": round(pre_forward_ips, 1),
                "extract_images_per_s": round(pre_extract_ips, 1),
            },
            "channels_last": nhwc,
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
                "resident_seconds_per_epoch": cached["seconds_per_epoch"],
                "dataloader_seconds_per_epoch": through_loader["seconds_per_epoch"],
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
            "precision": dataclasses.asdict(ctx.tools.precision),
        },
        "device": device_name,
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
        f"forward {t['forward_images_per_s']} img/s, extraction + write {t['extract_images_per_s']} img/s "
        f"({'NHWC' if t['channels_last'] else 'NCHW'}); by layout: "
        + ", ".join(f"{k.upper()} {v} img/s" for k, v in t["extract_images_per_s_by_layout"].items()),
        f"pre-decoded inputs: forward {t['predecoded']['forward_images_per_s']} img/s, extraction + write "
        f"{t['predecoded']['extract_images_per_s']} img/s",
        f"head x{t['head']['epochs']} epochs: cached {t['head']['cached_total_seconds']} s "
        f"(test acc {t['head']['cached_test_acc']:.4f}) vs live {t['head']['live_total_seconds']} s "
        f"(test acc {t['head']['live_test_acc']:.4f})",
        f"cached head epoch: {t['head']['resident_seconds_per_epoch']} s with resident batches vs "
        f"{t['head']['dataloader_seconds_per_epoch']} s through a DataLoader",
        f"partial from {t['partial']['split_level']}: {t['partial']['cached_seconds_per_epoch']} s/epoch cached vs "
        f"{t['partial']['live_seconds_per_epoch']} s/epoch live, FLOP ratio {t['partial']['flop_ratio']:.2f}",
        f"cache read {t['read']['read_gb_per_s']:.2f} GB/s vs memcpy {t['read']['memcpy_gb_per_s']:.2f} GB/s",
        "bytes per image: "
        + "; ".join(f"{k} {sum(v.values()):,} (all levels)" for k, v in result["bytes_per_image"].items()),
        *fast_path_lines(result.get("cpu_fast_path", {})),
        *partial_views_lines(result.get("partial_views", {})),
        jpeg_line(result.get("jpeg_extraction", {})),
        f"device: {result['device']}",
    ]
    return "\n".join(lines)


def jpeg_line(jpeg: dict) -> str:
    if "skipped" in jpeg or not jpeg:
        return f"extraction from JPEG files: not measured ({jpeg.get('skipped', 'not run')})"
    return (
        f"extraction from JPEG files ({jpeg['images']} at {jpeg['image_size'][-1]} px): PIL in loader workers "
        f"{jpeg['pil_images_per_s']} img/s, decoded where the model runs {jpeg['device_images_per_s']} img/s "
        f"({jpeg['device_over_pil']}x)"
    )


def fast_path_lines(fast: dict) -> list[str]:
    """The CPU fast-path rows of the table: each mode's throughputs and ratios to NCHW fp32, or why not measured."""
    if "modes" not in fast:
        return [f"CPU fast path: not measured ({fast.get('skipped', 'no result')})"] if fast else []
    lines = [f"CPU fast path on {fast['dataset']} at {fast['image_size'][-1]} px ({fast['images']} images):"]
    for name, m in fast["modes"].items():
        r = fast["ratios"].get(name, {})
        lines.append(
            f"  {name}: forward (pre-decoded) {m['forward_predecoded_images_per_s']} img/s"
            f"{_ratio(r, 'forward_predecoded')}, extraction from JPEGs {m['extract_jpeg_images_per_s']} img/s"
            f"{_ratio(r, 'extract_jpeg')}, training step {m['train_step_images_per_s']} img/s{_ratio(r, 'train_step')}"
            f" ({r['train_step_over_old_path']}x the old path: NCHW fp32, BatchNorm unfolded), BatchNorm unfolded "
            f"{m['train_step_unfolded_images_per_s']} img/s{_ratio(r, 'train_step_unfolded')}"
        )
    lines += [f"  {name}: skipped, {why}" for name, why in fast["skipped"].items()]
    return lines


def _ratio(ratios: dict, key: str) -> str:
    value = ratios.get(f"{key}_over_nchw_fp32")
    return f" ({value}x NCHW fp32)" if value is not None else ""
