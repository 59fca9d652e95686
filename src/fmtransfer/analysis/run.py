"""``make analyze`` and the notebook: every analysis of a cache, as figures plus ``analysis.md``/``analysis.json``.

The cache is the one ``make train`` built for the same config (a hit), so analysing costs no extraction.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import timm
import torch
from omegaconf import DictConfig

from fmtransfer.analysis.depth import transfer_by_depth
from fmtransfer.analysis.embedding import embed_2d
from fmtransfer.analysis.figures import (
    activation_grid,
    cka_figure,
    depth_figure,
    embedding_figure,
    saliency_figure,
    statistics_figure,
)
from fmtransfer.analysis.saliency import grad_cam, occlusion_sensitivity
from fmtransfer.analysis.similarity import cka_between, cka_matrix
from fmtransfer.analysis.statistics import all_level_statistics, receptive_fields, shapes_table
from fmtransfer.backbone import (
    PRE_LOGITS,
    FeatureMapExtractor,
    build_eval_transform,
    build_suffix,
    describe_backbone,
    parse_levels,
)
from fmtransfer.cache import CacheResult
from fmtransfer.data import to_rgb
from fmtransfer.heads import LinearProbeHead, PooledFeatureDataset
from fmtransfer.regimes import RunContext, for_run_dir, start_run
from fmtransfer.regimes.context import as_level_spec
from fmtransfer.regimes.live import pre_logits_head
from fmtransfer.training import instantiate_training


@dataclasses.dataclass
class Analysis:
    """A run context plus its cached splits: what every analysis function needs."""

    ctx: RunContext
    caches: dict[str, CacheResult]

    @property
    def levels(self) -> list[str]:
        return self.caches["train"].split.level_names

    def pooled(self, split: str, levels: list[str] | None = None) -> PooledFeatureDataset:
        return PooledFeatureDataset.from_cache(self.caches[split].split, levels or self.levels)


def open_analysis(cfg: DictConfig, out_dir: Path) -> Analysis:
    """Prepare splits and the cache (``cache.levels``, as ``make train`` cached them)."""
    cfg = for_run_dir(cfg, out_dir)
    ctx = start_run(cfg, out_dir, instantiate_training(cfg))
    levels = parse_levels(as_level_spec(cfg.cache.levels), ctx.spec.levels)
    return Analysis(ctx, ctx.cache_splits(ctx.cache_spec(levels)))


def input_image(an: Analysis, split: str, index: int) -> np.ndarray:
    """The image as the backbone saw it (resized and cropped, not normalised), for display."""
    cfg = dict(an.ctx.data_config, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    x = build_eval_transform(cfg)(to_rgb(an.ctx.data.splits[split][index]["image"]))
    return x.permute(1, 2, 0).clamp(0, 1).numpy()


def frozen_classifier(an: Analysis) -> tuple[torch.nn.Module, LinearProbeHead]:
    """The pretrained backbone and a linear probe on its pre-logits (fitted on train, selected on validation)."""
    head = pre_logits_head(an.ctx, probe_init=True, regime="analysis")
    model, _ = an.ctx.spec.create()
    return model.eval(), head.eval()


def saliency_maps(
    an: Analysis, classifier: tuple[torch.nn.Module, LinearProbeHead], level: str, split: str, index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input image, Grad-CAM at ``level``, occlusion map) for one image and its true class.

    ``classifier`` is ``frozen_classifier(an)``, built once for all the images.
    """
    model, head = classifier
    lv = next(v for v in an.ctx.spec.levels if v.name == level)
    x = build_eval_transform(an.ctx.data_config)(to_rgb(an.ctx.data.splits[split][index]["image"]))[None]
    target = int(an.ctx.data.splits[split][index]["label"])
    to_level = FeatureMapExtractor(model, [lv])
    suffix = build_suffix(model, lv)
    cam = grad_cam(lambda img: to_level(img)[level], lambda fmap: head({PRE_LOGITS: suffix(fmap)}), x, target)
    full = FeatureMapExtractor(model, [an.ctx.spec.levels[-1]])
    size = x.shape[-1]
    occ = occlusion_sensitivity(
        lambda img: head(full(img)), x, target, patch=max(4, size // 7), stride=max(2, size // 14)
    )
    return input_image(an, split, index), cam.numpy(), occ.numpy()


def finetuned_similarity(an: Analysis, checkpoint: str, split: str = "validation") -> dict[str, float]:
    """Per-level CKA between the frozen backbone and a fine-tuned one (a finetune run's checkpoint) on ``split``."""
    tuned_spec = describe_backbone(an.ctx.spec.name, "checkpoint", checkpoint)
    tuned = dataclasses.replace(an.ctx, spec=tuned_spec)
    levels = parse_levels(an.levels, tuned_spec.levels)
    caches = tuned.cache_splits(tuned.cache_spec(levels))
    frozen = an.pooled(split).features
    other = PooledFeatureDataset.from_cache(caches[split].split, an.levels).features
    return cka_between(frozen, other)


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def run_analysis(cfg: DictConfig, out_dir: Path) -> dict:
    """Every analysis, written to ``out_dir`` as PNGs + ``analysis.md`` + ``analysis.json``."""
    a = cfg.analysis
    an = open_analysis(cfg, out_dir)
    figs: dict[str, str] = {}
    with torch.device("cpu"):
        arch = timm.create_model(an.ctx.spec.name)  # receptive fields depend on the architecture only
    rf = receptive_fields(
        arch,
        {lv.name: lv.index for lv in an.ctx.spec.levels if lv.name in an.levels and lv.index is not None},
        input_size=a.rf_input_size,
    )
    shapes = shapes_table(an.caches[a.split].split, rf)
    stats = all_level_statistics(an.caches[a.split].split)
    figs["statistics"] = _save(statistics_figure(stats), out_dir / "statistics.png")

    spatial = [n for n in an.levels if an.caches[a.eval_split].split.level(n).ndim == 4]
    grid_level = a.grid_level if a.grid_level in spatial else (spatial[len(spatial) // 2] if spatial else None)
    for i in a.images if grid_level else []:
        maps = an.caches[a.eval_split].split.level(grid_level)[i]
        figs[f"grid_{i}"] = _save(
            activation_grid(
                maps,
                input_image(an, a.eval_split, i),
                a.top_n,
                f"{grid_level}: top {a.top_n} channels, {a.eval_split} image {i}",
            ),
            out_dir / f"grid_{grid_level}_{i}.png",
        )
    depth = transfer_by_depth(an.caches["train"].split, an.caches["validation"].split)
    figs["depth"] = _save(depth_figure(depth, "validation"), out_dir / "depth.png")
    val = an.pooled(a.eval_split)
    names, cka = cka_matrix(val.features)
    figs["cka"] = _save(cka_figure(names, cka), out_dir / "cka.png")
    tuned_cka = finetuned_similarity(an, a.finetuned_checkpoint) if a.finetuned_checkpoint else None

    labels = val.labels.numpy()
    keep = np.random.default_rng(0).permutation(len(labels))[: a.max_points]
    for method in ("pca", "tsne") if a.tsne else ("pca",):
        points = {n: embed_2d(val.features[n].numpy()[keep], method) for n in names}
        figs[f"embedding_{method}"] = _save(
            embedding_figure(points, labels[keep], an.ctx.data.class_names, method), out_dir / f"embedding_{method}.png"
        )
    cam_level = a.cam_level if a.cam_level in spatial else (spatial[-1] if spatial else None)
    if cam_level:
        classifier = frozen_classifier(an)
        for i in a.images[:2]:
            img, cam, occ = saliency_maps(an, classifier, cam_level, a.eval_split, i)
            figs[f"saliency_{i}"] = _save(
                saliency_figure(img, cam, occ, f"Grad-CAM at {cam_level}, {a.eval_split} image {i}"),
                out_dir / f"saliency_{i}.png",
            )
    result = {
        "cache": {s: str(c.split.path) for s, c in an.caches.items()},
        "statistics_split": a.split,
        "shapes": shapes,
        "statistics": {n: s.summary() for n, s in stats.items()},
        "transfer_by_depth": {"split": "validation", "fit_on": "train", "accuracy": depth},
        "cka_between_levels": {"split": a.eval_split, "levels": names, "matrix": cka.round(4).tolist()},
        "cka_frozen_vs_finetuned": tuned_cka,
        "figures": figs,
    }
    (out_dir / "analysis.json").write_text(json.dumps(result, indent=2))
    (out_dir / "analysis.md").write_text(render_markdown(result, an))
    return result


def shapes_markdown(shapes: list[dict]) -> str:
    """The shapes table as Markdown (used by analysis.md and the notebook)."""
    rows = [
        "| level | channels | cached spatial | stride | receptive field (px) | bytes / image |",
        "|---|---|---|---|---|---|",
    ]
    rows += [
        f"| {r['level']} | {r['channels']} | {r['spatial']} | {r['stride'] or '–'} | "
        f"{r['receptive_field'] or '–'} | {r['bytes_per_image']:,} |"
        for r in shapes
    ]
    return "\n".join(rows)


def render_markdown(result: dict, an: Analysis) -> str:
    stats = ["| level | mean sparsity | dead channels | mean class selectivity |", "|---|---|---|---|"]
    stats += [
        f"| {s['level']} | {s['mean_sparsity']:.3f} | {s['dead_channels']} / {s['channels']} | "
        f"{s['mean_selectivity']:.3f} |"
        for s in result["statistics"].values()
    ]
    depth = result["transfer_by_depth"]["accuracy"]
    best = max((k for k in depth if k != "all levels"), key=depth.get)
    md = [
        f"# Feature-map analysis: {an.ctx.cfg.data.path} with {an.ctx.spec.name}",
        "",
        f"Cache entries: {', '.join(f'`{p}`' for p in result['cache'].values())}.",
        "",
        "## Shapes",
        "",
        shapes_markdown(result["shapes"]),
        "",
        f"## What each level holds ({result['statistics_split']} split)",
        "",
        *stats,
        "",
        "Sparsity: fraction of values with |x| ≈ 0 (as cached; average pooling makes maps denser). Dead: zero on at "
        "least 99% of images. Selectivity: (top class mean − mean of the others) / (their sum).",
        "",
        "## Transfer by depth (linear probe, fitted on train, scored on validation)",
        "",
        " | ".join(f"{k}: {v:.3f}" for k, v in depth.items()),
        "",
        f"Best single level: **{best}** ({depth[best]:.3f}); all levels together: {depth['all levels']:.3f}.",
        "",
    ]
    if result["cka_frozen_vs_finetuned"]:
        md += [
            "## Frozen vs fine-tuned (linear CKA per level)",
            "",
            " | ".join(f"{k}: {v:.3f}" for k, v in result["cka_frozen_vs_finetuned"].items()),
            "",
        ]
    md += ["## Figures", ""] + [f"![{k}]({v})" for k, v in result["figures"].items()] + [""]
    return "\n".join(md)
