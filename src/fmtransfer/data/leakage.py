"""Leakage check: test images that are copies of training (or validation) images, found before anything trains.

- **Exact** duplicates: the same file content (a hash of the encoded bytes).
- **Near** duplicates (resized, re-encoded, recompressed copies): the correlation of 32x32 grayscale thumbnails of the
  centre square (mean removed, unit norm), above ``threshold`` and not exact.

Why thumbnails and not the backbone's pre-logits: measured on the shared datasets (docs/leakage.md), a copy resized to
90 % and re-saved as JPEG quality 85 keeps a pre-logits cosine of only 0.764 with its original on UIUC textures, while
distinct photos of the same texture class reach 0.986, so no pre-logits threshold separates them; thumbnails keep
>= 0.998 for such copies and <= 0.977 (textures) / 0.815 (hymenoptera) for distinct same-class photos.

Pairs are searched block by block (``BLOCK`` query rows against all reference rows at a time): memory grows with
``BLOCK x references``, never ``n x n``; time with ``queries x references`` (1,000 x 10,000 images: about a second).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from fmtransfer.errors import ConfigError

THUMB = 32
BLOCK = 2048
DEFAULT_THRESHOLD = 0.99
# (held-out split, split it is checked against): the test split against every other split, validation against train.
CHECKS = (("test", "train"), ("test", "validation"), ("validation", "train"))
DEDUPE = ("off", "drop_from_test", "drop_from_train")


@dataclass(frozen=True)
class Pair:
    """Row ``row`` of ``split`` duplicates row ``other_row`` of ``other``."""

    split: str
    row: int
    other: str
    other_row: int
    kind: str  # exact | near
    score: float
    file: str = ""  # where known (images stored as paths)
    other_file: str = ""


@dataclass
class LeakageReport:
    """The pairs found (row indices of the splits as checked, before any dedupe) and what dedupe dropped."""

    threshold: float
    pairs: list[Pair] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {k: sum(p.kind == k for p in self.pairs) for k in ("exact", "near")}

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "pairs": [asdict(p) for p in self.pairs], "dropped": self.dropped}

    @classmethod
    def from_dict(cls, data: dict) -> LeakageReport:
        return cls(data["threshold"], [Pair(**p) for p in data["pairs"]], dict(data.get("dropped") or {}))

    def summary(self, limit: int = 3) -> str:
        """One line naming the first pairs, for the run's log."""
        c = self.counts()
        first = "; ".join(
            f"{p.split}[{p.row}] {p.kind} {p.other}[{p.other_row}]"
            + (f" ({Path(p.file).name} ~ {Path(p.other_file).name})" if p.file and p.other_file else "")
            for p in self.pairs[:limit]
        )
        return f"{c['exact']} exact and {c['near']} near-duplicate pair(s) across splits, e.g. {first}"


def content_hashes(split: Dataset) -> tuple[list[str], list[str]]:
    """A hash of each image's encoded bytes (the file's, for images stored as paths), and each image's path ("" for
    images stored as bytes)."""
    raw = split.cast_column("image", ImageFeature(decode=False))
    hashes, paths = [], []
    for image in raw["image"]:
        data = image.get("bytes")
        if data is None:
            data = Path(image["path"]).read_bytes()
        hashes.append(hashlib.blake2b(data, digest_size=16).hexdigest())
        paths.append(image.get("path") or "")
    return hashes, paths


def thumbnail(image: Image.Image) -> np.ndarray:
    """The centre square as 32x32 grayscale, mean removed, unit norm (flat images: all zeros)."""
    gray = image.convert("L")
    w, h = gray.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    small = gray.crop((left, top, left + side, top + side)).resize((THUMB, THUMB), Image.BILINEAR)
    a = np.asarray(small, dtype=np.float32).ravel()
    a -= a.mean()
    norm = float(np.linalg.norm(a))
    return a / norm if norm > 0 else a


def thumbnails(split: Dataset) -> np.ndarray:
    return np.stack([thumbnail(im) for im in split["image"]]) if len(split) else np.zeros((0, THUMB * THUMB))


def similar_pairs(queries: np.ndarray, references: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """``(query row, reference row, correlation)`` of every pair at or above ``threshold``, in blocks."""
    out = []
    for start in range(0, len(queries), BLOCK):
        scores = queries[start : start + BLOCK] @ references.T
        rows, cols = np.nonzero(scores >= threshold)
        out += [(int(r) + start, int(c), float(scores[r, c])) for r, c in zip(rows, cols, strict=True)]
    return out


def duplicate_groups(split: Dataset, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """A group id per row of ``split``: rows that are exact or near copies of each other (the same tests as
    ``find_leakage``, within one split, transitively) share an id; every other row has its own. Cross-validation
    keeps a group in one fold, so no copy of a validation image is trained on."""
    hashes, _ = content_hashes(split)
    parent = list(range(len(split)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    pairs = [(first.setdefault(h, i), i) for i, h in enumerate(hashes)]
    thumbs = thumbnails(split)
    pairs += [(i, j) for i, j, _ in similar_pairs(thumbs, thumbs, threshold) if i < j]
    for i, j in pairs:
        parent[root(j)] = root(i)
    roots = np.array([root(i) for i in range(len(split))], dtype=np.int64)
    return np.unique(roots, return_inverse=True)[1]


def find_leakage(splits: Mapping[str, Dataset], threshold: float = DEFAULT_THRESHOLD) -> LeakageReport:
    """Exact and near duplicates for every check in ``CHECKS`` whose splits exist."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"data.leakage.threshold={threshold} must be in (0, 1] (default {DEFAULT_THRESHOLD}).")
    hashes, paths = {}, {}
    for name, ds in splits.items():
        hashes[name], paths[name] = content_hashes(ds)
    thumbs = {name: thumbnails(ds) for name, ds in splits.items()}
    report = LeakageReport(threshold)
    for held, other in CHECKS:
        if held not in splits or other not in splits:
            continue
        index: dict[str, list[int]] = {}
        for j, h in enumerate(hashes[other]):
            index.setdefault(h, []).append(j)
        exact = {(i, j) for i, h in enumerate(hashes[held]) for j in index.get(h, [])}
        found = [(i, j, "exact", 1.0) for i, j in sorted(exact)]
        found += [(i, j, "near", round(s, 6)) for i, j, s in similar_pairs(thumbs[held], thumbs[other], threshold)]
        report.pairs += [
            Pair(held, i, other, j, kind, score, paths[held][i], paths[other][j])
            for i, j, kind, score in found
            if kind == "exact" or (i, j) not in exact
        ]
    return report


def dedupe(splits: dict[str, Dataset], report: LeakageReport, mode: str) -> dict[str, Dataset]:
    """``splits`` without the duplicated rows: ``drop_from_test`` removes the held-out side of every pair (test, or
    validation when checked against train), ``drop_from_train`` the other side; ``off`` keeps everything."""
    if mode not in DEDUPE:
        raise ConfigError(f"data.dedupe={mode} is not known; choose one of {list(DEDUPE)}.")
    if mode == "off" or not report.pairs:
        return splits
    drop: dict[str, set[int]] = {}
    for p in report.pairs:
        split, row = (p.split, p.row) if mode == "drop_from_test" else (p.other, p.other_row)
        drop.setdefault(split, set()).add(row)
    out = dict(splits)
    for split, rows in drop.items():
        out[split] = splits[split].select([i for i in range(len(splits[split])) if i not in rows])
        report.dropped[split] = len(rows)
    return out


def write_pairs(path: Path, report: LeakageReport) -> None:
    """The pairs as CSV: ``split,row,other_split,other_row,kind,score,file,other_file`` (rows as checked)."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "row", "other_split", "other_row", "kind", "score", "file", "other_file"])
        for p in report.pairs:
            writer.writerow([p.split, p.row, p.other, p.other_row, p.kind, p.score, p.file, p.other_file])
    tmp.replace(path)
