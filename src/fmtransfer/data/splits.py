"""Train/validation/test splits: given splits are kept, missing ones are carved from train (stratified, seeded)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from datasets import DatasetDict
from sklearn.model_selection import train_test_split

from fmtransfer.data.images import label_array
from fmtransfer.errors import ConfigError, DataError

CANONICAL_SPLITS = ("train", "validation", "test")


def rename_splits(dsd: DatasetDict, mapping: Mapping[str, str] | None) -> DatasetDict:
    """Rename splits, e.g. ``{"validation": "test"}`` when a folder's only held-out split is the evaluation set."""
    if not mapping:
        return dsd
    unknown = [k for k in mapping if k not in dsd]
    if unknown:
        raise ConfigError(f"data.rename_splits names {unknown}, but the dataset has splits {sorted(dsd)}.")
    bad = [v for v in mapping.values() if v not in CANONICAL_SPLITS]
    if bad:
        raise ConfigError(f"data.rename_splits targets {bad}; targets must be among {CANONICAL_SPLITS}.")
    return DatasetDict({mapping.get(k, k): v for k, v in dsd.items()})


def make_splits(
    dsd: DatasetDict, val_fraction: float, test_fraction: float, seed: int
) -> tuple[DatasetDict, dict[str, str]]:
    """Return train/validation/test, carving missing held-out splits from ``train``.

    The second value says where each split came from (``given`` or how it was made), for the run's records.
    """
    extra = sorted(set(dsd) - set(CANONICAL_SPLITS))
    if extra:
        raise DataError(
            f"unexpected split(s) {extra}; expected {list(CANONICAL_SPLITS)}. "
            f"Map them with data.rename_splits={{{extra[0]}: validation}} (or test)."
        )
    if "train" not in dsd:
        raise DataError(f"the dataset has no train split (it has {sorted(dsd)}).")
    for name, frac in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if not 0.0 < frac < 1.0:
            raise ConfigError(f"{name}={frac} must be between 0 and 1 (exclusive).")
    source = {k: "given" for k in dsd}
    train = dsd["train"]
    out = dict(dsd)
    # Test first, so the validation fraction is a fraction of what is left for training.
    for split, frac in (("test", test_fraction), ("validation", val_fraction)):
        if split in out:
            continue
        keep, held = stratified_indices(label_array(train), frac, seed, split)
        out[split] = train.select(held)
        train = train.select(keep)
        source[split] = f"made from train: {frac:.0%} stratified, seed {seed}"
    out["train"] = train
    if source["train"] == "given" and len(train) != len(dsd["train"]):
        source["train"] = "given, minus the held-out splits made from it"
    return DatasetDict({k: out[k] for k in CANONICAL_SPLITS}), {k: source[k] for k in CANONICAL_SPLITS}


def stratified_indices(labels: np.ndarray, fraction: float, seed: int, what: str) -> tuple[list[int], list[int]]:
    """Indices (kept, held out) of a stratified, seeded split; both sorted so dataset order is preserved."""
    counts = np.bincount(labels)
    present = counts[counts > 0]
    if present.min() < 2:
        raise DataError(
            f"cannot make a stratified {what} split: class {int(np.argmin(np.where(counts > 0, counts, 1 << 30)))} "
            f"has a single training image. Add images, or provide a {what} split yourself."
        )
    n_held = max(round(len(labels) * fraction), len(present))
    if len(labels) - n_held < len(present):
        raise DataError(
            f"too few training images ({len(labels)}) to hold out a {what} split for {len(present)} classes."
        )
    keep, held = train_test_split(np.arange(len(labels)), test_size=n_held, stratify=labels, random_state=seed)
    return sorted(keep.tolist()), sorted(held.tolist())


def select_shots(labels: np.ndarray, shots_per_class: int, seed: int) -> list[int]:
    """Indices of ``shots_per_class`` images per class (seeded, sorted); every class must have that many."""
    if shots_per_class < 1:
        raise ConfigError(f"data.shots_per_class={shots_per_class} must be a positive integer (or null for all).")
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        if len(idx) < shots_per_class:
            raise DataError(
                f"data.shots_per_class={shots_per_class}, but class {int(cls)} has only {len(idx)} training "
                f"images; lower shots_per_class to at most {len(idx)}."
            )
        chosen.extend(rng.choice(idx, size=shots_per_class, replace=False).tolist())
    return sorted(chosen)


def stratified_folds(labels: np.ndarray, folds: int, seed: int, groups: np.ndarray | None = None) -> list[np.ndarray]:
    """The held-out indices of each of ``folds`` stratified folds (seeded, each sorted); every class must have at
    least ``folds`` images (``cv_folds_for`` says how many folds a pool allows). ``groups`` (a group id per row:
    copies of one image) keeps each group inside one fold (scikit-learn's ``StratifiedGroupKFold``); without a
    group of two or more rows the folds are ``StratifiedKFold``'s."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    x = np.zeros(len(labels))
    if groups is not None and len(np.unique(groups)) < len(groups):
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        return [np.sort(held) for _, held in splitter.split(x, labels, groups)]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [np.sort(held) for _, held in splitter.split(x, labels)]


def cv_folds_for(labels: np.ndarray, folds: int) -> int:
    """``folds``, lowered to the smallest class count (a stratified fold needs an image of every class); 0 when a
    class has a single image (no fold can hold one out and still train on it)."""
    smallest = int(np.bincount(labels)[np.unique(labels)].min())
    return min(int(folds), smallest) if smallest >= 2 else 0
