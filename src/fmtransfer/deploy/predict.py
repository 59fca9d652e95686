"""``make predict``: classify images with a finished run, writing ``predictions.csv``.

The input is a flat folder of unlabelled images, an ImageFolder, a CSV (``image``, ``label`` columns), or anything
else ``data.path`` takes; every split of it is classified (the run's split settings do not apply). A frozen run reads
the images' maps through the feature cache, so images already extracted with the same settings are not run through
the backbone again.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import ClassLabel, Dataset, Features, concatenate_datasets
from datasets import Image as ImageFeature
from torch.utils.data import DataLoader

from fmtransfer.backbone import FeatureMapExtractor, build_eval_transform
from fmtransfer.cache import CacheSpec, FeatureCache, ensure_feature_cache
from fmtransfer.data import ImageClassificationDataset, load_image_dataset
from fmtransfer.deploy.model import build_classifier, frozen_head, head_grids, head_levels
from fmtransfer.deploy.rundir import FinishedRun
from fmtransfer.errors import DataError
from fmtransfer.heads import PooledFeatureDataset
from fmtransfer.training import in_precision

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
PREDICT_SPLIT = "predict"  # the cache's split name for prediction inputs


@dataclass
class PredictionInput:
    """Images to classify, in output order: a dataset (``image``, ``label`` as the run's classes; 0 when
    unlabelled), where each came from, and whether the labels are real."""

    images: Dataset
    paths: list[str]
    labelled: bool


def flat_image_files(folder: Path) -> list[Path] | None:
    """The images directly in ``folder`` when it holds images and no class subfolders; None otherwise."""
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    subfolders = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return files if files and not subfolders else None


def read_input(
    path: str, class_names: list[str], cache_dir: str | None = None, csv_columns: dict[str, str] | None = None
) -> PredictionInput:
    """``path`` as images to classify (see the module doc); ``csv_columns`` names a CSV's columns."""
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=class_names)})
    flat = flat_image_files(Path(path).expanduser())
    if flat is not None:
        files = [str(p.resolve()) for p in flat]
        images = Dataset.from_dict({"image": files, "label": [0] * len(files)}, features=features)
        return PredictionInput(images, files, labelled=False)
    dsd, _, _ = load_image_dataset(path, "auto", cache_dir, csv_columns)
    parts, paths = [], []
    for split, ds in dsd.items():
        names = ds.features["label"].names
        unknown = sorted(set(names) - set(class_names))
        if unknown:
            raise DataError(
                f"data.path={path}: classes {unknown} are not among the run's classes {class_names}; predict needs "
                f"labels the run knows (or a flat folder of unlabelled images)."
            )
        to_run = {i: class_names.index(n) for i, n in enumerate(names)}
        raw = ds.cast_column("image", ImageFeature(decode=False))
        paths += [img.get("path") or f"{split}/{i}" for i, img in enumerate(raw["image"])]
        labels = [to_run[label] for label in ds["label"]]
        parts.append(ds.remove_columns("label").cast_column("image", ImageFeature()).add_column("label", labels))
    return PredictionInput(concatenate_datasets(parts).cast(features), paths, labelled=True)


def frozen_probabilities(run: FinishedRun, images: Dataset, batch_size: int, num_workers: int) -> torch.Tensor:
    """A frozen run's class probabilities through the feature cache (extracted only on a miss)."""
    levels = head_levels(run)
    c = run.cfg.cache
    spec = CacheSpec(tuple(levels), c.dtype, c.pool, c.pool_size)
    result = ensure_feature_cache(
        FeatureCache.from_config(c),
        PREDICT_SPLIT,
        images,
        run.class_names,
        run.spec.name,
        run.spec.weights.identity(),
        run.data_config,
        build_eval_transform(run.data_config),
        spec,
        lambda: FeatureMapExtractor(run.spec.create()[0], list(levels)),
        # The run's extraction precision: bf16 maps differ from fp32 ones, and the head learned from the run's.
        trainer_kwargs={"accelerator": "cpu", "precision": run.precision["extraction"], "enable_progress_bar": False},
        batch_size=batch_size,
        num_workers=num_workers,
        channels_last=run.channels_last,
    )
    log.info(f"{'hit: reusing' if result.hit else 'extracted'} {result.split.path}")
    pooled = PooledFeatureDataset.from_cache(result.split, [lv.name for lv in levels], head_grids(run))
    with torch.no_grad(), in_precision(run.precision["training"], "cpu"):
        return frozen_head(run)(pooled.features).float().softmax(-1)


def live_probabilities(run: FinishedRun, images: Dataset, batch_size: int, num_workers: int) -> torch.Tensor:
    """The run's whole model on the images (its eval preprocessing), in batches."""
    model = build_classifier(run)
    loader = DataLoader(
        ImageClassificationDataset(images, build_eval_transform(run.data_config)),
        batch_size=batch_size,
        num_workers=num_workers,
    )  # build_classifier lays the model out as the run did (channels-last converts its inputs as they arrive)
    out = []
    with torch.no_grad():
        for x, _, _ in loader:
            out.append(model(x).float().softmax(-1))
    return torch.cat(out)


def predict(
    run: FinishedRun,
    data_path: str,
    out: Path,
    batch_size: int = 64,
    num_workers: int = 0,
    csv_columns: dict[str, str] | None = None,
) -> Path:
    """Classify ``data_path`` with ``run``; writes ``out`` (``path,pred,prob_<class>...[,label]``) and returns it."""
    inputs = read_input(data_path, run.class_names, str(Path(run.cfg.paths.data_dir) / "hf"), csv_columns)
    log.info(f"{len(inputs.paths)} images from {data_path} with the {run.regime} run {run.path}")
    probabilities = frozen_probabilities if run.regime == "frozen" else live_probabilities
    probs = probabilities(run, inputs.images, batch_size, num_workers)
    names = run.class_names
    labels = inputs.images["label"] if inputs.labelled else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "pred", *(f"prob_{c}" for c in names), *(["label"] if labels is not None else [])])
        for i, row in enumerate(probs.tolist()):
            pred = names[max(range(len(row)), key=row.__getitem__)]
            writer.writerow(
                [inputs.paths[i], pred, *(f"{p:.6f}" for p in row), *([names[labels[i]]] if labels else [])]
            )
    tmp.replace(out)  # never a half-written predictions.csv
    if labels is not None:
        accuracy = sum(names[labels[i]] == names[int(p.argmax())] for i, p in enumerate(probs)) / len(labels)
        log.info(f"accuracy on the given labels: {accuracy:.4f}")
    return out
