"""From a data config to ready splits: load, rename, split, subsample to k shots."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets

from fmtransfer.data.images import label_array, shared_workers, split_fingerprint
from fmtransfer.data.leakage import DEFAULT_THRESHOLD, LeakageReport, duplicate_groups, find_leakage
from fmtransfer.data.leakage import dedupe as dedupe_splits
from fmtransfer.data.sources import DataSource, load_image_dataset
from fmtransfer.data.splits import make_splits, rename_splits, select_shots, stratified_folds
from fmtransfer.data.validate import BadImage, check_classes, drop_bad_images
from fmtransfer.errors import ConfigError
from fmtransfer.hashing import mapping_key


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
    # Under cross-validation (``data.cv``): the splits before folding, and where each row of a folded split comes
    # from, ``{split: (base split names, row indices)}``, so its feature maps are gathered from the base splits'
    # cache entries instead of being extracted again.
    base_splits: DatasetDict | None = None
    origin: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)
    leakage: LeakageReport | None = None  # None: not checked (data.leakage.check=false)
    # A cross-validation fold's validation rows as indices into the pool (the same for every regime of a
    # comparison), so out-of-fold predictions of different regimes are paired image by image.
    validation_rows: np.ndarray | None = None

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
    cv: CrossValidation | None = None,
    leakage_threshold: float | None = DEFAULT_THRESHOLD,
    dedupe: str = "off",
    leakage_index: str = "auto",
) -> PreparedData:
    """Load ``path`` and return train/validation/test splits; k-shot subsampling applies to train only.

    Every image is decoded once (remembered under ``cache_dir``) so unreadable files are reported up front, or
    skipped and recorded with ``skip_bad``. The leakage check (``leakage_threshold``; None: off) looks for copies of
    training/validation images in the held-out splits before k-shot subsampling (near copies searched as
    ``leakage_index`` says: auto, dense, faiss); ``dedupe`` drops them.
    """
    dsd, source, notes = load_image_dataset(path, fmt, cache_dir, csv_columns)
    with shared_workers(sum(len(split) for split in dsd.values())):  # one pool for every split's scan and check
        dsd, skipped = drop_bad_images(dsd, skip_bad, Path(cache_dir) / "image_scans" if cache_dir else None)
        if skipped:
            notes.append(f"skipped {len(skipped)} unreadable image(s) (data.skip_bad=true), e.g. {skipped[0].file}")
        dsd = rename_splits(dsd, rename)
        splits, split_source = make_splits(dsd, val_fraction, test_fraction, split_seed)
        check_classes(splits)
        notes += [f"{k} split {v}" for k, v in split_source.items() if v != "given"]
        leakage, memo = None, Path(cache_dir) / "leakage" if cache_dir else None
        if leakage_threshold is not None:
            leakage = cached_leakage(splits, leakage_threshold, memo, leakage_index)
            if leakage.pairs:
                notes.append(f"warning: {leakage.summary()} (data.dedupe={dedupe})")
            splits = DatasetDict(dedupe_splits(dict(splits), leakage, dedupe))
            notes += [f"data.dedupe={dedupe}: dropped {n} {split} image(s)" for split, n in leakage.dropped.items()]
        if shots_per_class is not None:
            idx = select_shots(label_array(splits["train"]), shots_per_class, shots_seed)
            splits["train"] = splits["train"].select(idx)
            split_source["train"] += f"; {shots_per_class} shots per class (seed {shots_seed})"
            notes.append(f"train subsampled to {shots_per_class} images per class (seed {shots_seed})")
        class_names = list(splits["train"].features["label"].names)
        prepared = PreparedData(
            splits, source, class_names, split_source, shots_per_class, notes, skipped, leakage=leakage
        )
        if cv is None or (cv.fold is None and not cv.refit and not cv.given_validation):
            return prepared
        return fold_splits(
            prepared, cv, split_seed, lambda pool: pool_groups(pool, leakage_threshold, memo, leakage_index)
        )


def pool_groups(pool, threshold: float | None, memo_dir: Path | None, index: str = "auto") -> np.ndarray | None:
    """``duplicate_groups`` of the labelled pool (None when the leakage check is off), remembered under
    ``memo_dir`` by the pool's content fingerprint: every fold run of a comparison folds the same pool."""
    if threshold is None:
        return None
    key = mapping_key(
        {"pool": split_fingerprint(pool), "threshold": threshold, "what": "duplicate groups", "index": index}
    )
    memo = memo_dir / f"groups-{key}.npy" if memo_dir is not None else None
    if memo is not None and memo.is_file():
        return np.load(memo)
    groups = duplicate_groups(pool, threshold, index)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, groups)
        tmp.replace(memo)
    return groups


def cached_leakage(splits: DatasetDict, threshold: float, memo_dir: Path | None, index: str = "auto") -> LeakageReport:
    """``find_leakage`` of these splits, remembered under ``memo_dir`` by their content fingerprints (every run of a
    comparison, and every cross-validation fold, prepares the same splits)."""
    fingerprints = {n: split_fingerprint(ds) for n, ds in splits.items()}
    key = mapping_key({"splits": fingerprints, "threshold": threshold, "index": index})
    memo = memo_dir / f"{key}.json" if memo_dir is not None else None
    if memo is not None and memo.is_file():
        return LeakageReport.from_dict(json.loads(memo.read_text()))
    report = find_leakage(splits, threshold, index)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report.as_dict()))
        tmp.replace(memo)
    return report


@dataclass(frozen=True)
class CrossValidation:
    """``data.cv``: which part of the labelled pool a run trains and validates on.

    The pool is train + validation, or under k-shot only the k shots per class (a user with k labels has nothing
    else). ``fold=i`` of ``folds``: train on the pool minus stratified fold i, validate on fold i. ``refit``: train
    on the whole pool for ``epochs`` epochs, no validation (the settings and epochs were chosen by the folds).
    """

    folds: int = 5
    fold: int | None = None
    refit: bool = False
    epochs: int | None = None
    # A refit's learning-rate schedule spans this many epochs (the folds' planned epochs), so that each of its
    # ``epochs`` epochs runs at the learning rate the folds validated; None: ``epochs``.
    horizon: int | None = None
    given_validation: bool = False  # the selection "fold" is the given validation split (train on train)


def is_selection_run(cv: Mapping | None) -> bool:
    """Whether ``data.cv`` (its config) makes a selection run: a fold, or the given validation split as the one
    "fold". A selection run is scored on its held-out images and never touches the test split."""
    return cv is not None and (cv.get("fold") is not None or bool(cv.get("given_validation")))


def pool_of(prepared: PreparedData) -> tuple[list[str], np.ndarray]:
    """The labelled pool as (base split of each row, row index in it)."""
    names = ["train"] if prepared.shots_per_class is not None else ["train", "validation"]
    splits = [(name, i) for name in names for i in range(len(prepared.splits[name]))]
    return [s for s, _ in splits], np.asarray([i for _, i in splits], dtype=np.int64)


def fold_splits(
    prepared: PreparedData, cv: CrossValidation, seed: int, groups_of: Callable[[Dataset], np.ndarray | None]
) -> PreparedData:
    """``prepared`` with train/validation replaced by a fold of the pool (or the whole pool, to refit on).

    ``groups_of(pool)``: a group id per pooled row (copies of one image share one); a group stays in one fold.
    ``cv.given_validation``: the one "fold" is the given validation split (train on train), not a k-fold one.
    """
    base = prepared.splits
    names, rows = pool_of(prepared)
    pool = concatenate_datasets([base[n] for n in dict.fromkeys(names)])
    labels = label_array(pool)
    if cv.refit:
        train_idx = val_idx = np.arange(len(pool))
        what = f"the whole labelled pool ({len(pool)} images: {' + '.join(dict.fromkeys(names))}), no validation"
    elif cv.given_validation:
        val_idx = np.flatnonzero(np.asarray(names) == "validation")
        train_idx = np.flatnonzero(np.asarray(names) != "validation")
        if not len(val_idx):  # a k-shot pool is the k shots alone
            raise ConfigError(
                "data.cv.given_validation=true scores on the given validation split, which a k-shot run "
                f"(data.shots_per_class={prepared.shots_per_class}) leaves out of its pool; use data.cv.fold instead."
            )
        what = f"train ({len(train_idx)} images); validation: the given validation split"
    else:
        held = stratified_folds(labels, cv.folds, seed, groups_of(pool))[cv.fold]
        train_idx, val_idx = np.setdiff1d(np.arange(len(pool)), held), held
        what = f"pool minus fold {cv.fold + 1} of {cv.folds} ({len(train_idx)} images); validation: that fold"
    splits = DatasetDict({"train": pool.select(train_idx), "validation": pool.select(val_idx), "test": base["test"]})
    origin = {
        split: ([names[i] for i in idx], rows[idx])
        for split, idx in (("train", train_idx), ("validation", val_idx))
        # A split that is its base split unchanged (a k-shot refit's train) is its base: its cache entry is the same.
        if not (
            len(idx) == len(base[split])
            and all(names[i] == split for i in idx)
            and (rows[idx] == np.arange(len(idx))).all()
        )
    }
    split_source = {**prepared.split_source, **{s: f"cross-validation: {what}" for s in ("train", "validation")}}
    return PreparedData(
        splits,
        prepared.source,
        prepared.class_names,
        split_source,
        prepared.shots_per_class,
        [*prepared.notes, f"train: {what}"],
        prepared.skipped,
        base_splits=base,
        origin=origin,
        leakage=prepared.leakage,
        validation_rows=None if cv.refit else val_idx,
    )
