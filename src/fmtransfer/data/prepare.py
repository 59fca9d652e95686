"""From a data config to ready splits: load, rename, split, subsample to k shots."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import DatasetDict

from fmtransfer.data.sources import DataSource, load_image_dataset
from fmtransfer.data.splits import make_splits, rename_splits, select_shots
from fmtransfer.data.validate import BadImage, check_classes, drop_bad_images


@dataclass
class PreparedData:
    """Splits ready for feature extraction, plus how they were made (recorded in manifests and metrics)."""

    splits: DatasetDict
    source: DataSource
    class_names: list[str]
    split_source: dict[str, str]
    shots_per_class: int | None = None
    notes: list[str] = field(default_factory=list)
    skipped: list[BadImage] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}


def prepare_data(
    path: str,
    fmt: str = "auto",
    rename: dict[str, str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    shots_per_class: int | None = None,
    shots_seed: int = 0,
    cache_dir: str | None = None,
    skip_bad: bool = False,
    csv_columns: dict[str, str] | None = None,
) -> PreparedData:
    """Load ``path`` and return train/validation/test splits; k-shot subsampling applies to train only.

    Every image is decoded once (remembered under ``cache_dir``) so unreadable files are reported up front, or
    skipped and recorded with ``skip_bad``.
    """
    dsd, source, notes = load_image_dataset(path, fmt, cache_dir, csv_columns)
    dsd, skipped = drop_bad_images(dsd, skip_bad, Path(cache_dir) / "image_scans" if cache_dir else None)
    if skipped:
        notes.append(f"skipped {len(skipped)} unreadable image(s) (data.skip_bad=true), e.g. {skipped[0].file}")
    dsd = rename_splits(dsd, rename)
    splits, split_source = make_splits(dsd, val_fraction, test_fraction, split_seed)
    check_classes(splits)
    notes += [f"{k} split {v}" for k, v in split_source.items() if v != "given"]
    if shots_per_class is not None:
        idx = select_shots(np.asarray(splits["train"]["label"]), shots_per_class, shots_seed)
        splits["train"] = splits["train"].select(idx)
        split_source["train"] += f"; {shots_per_class} shots per class (seed {shots_seed})"
        notes.append(f"train subsampled to {shots_per_class} images per class (seed {shots_seed})")
    class_names = list(splits["train"].features["label"].names)
    return PreparedData(splits, source, class_names, split_source, shots_per_class, notes, skipped)
