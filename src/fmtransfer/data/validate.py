"""Checks that catch messy inputs before any compute: unreadable images, odd folders, inconsistent classes."""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict
from PIL import Image

from fmtransfer.data.images import label_array, map_undecoded, split_fingerprint, to_rgb
from fmtransfer.errors import DataError

MAX_LISTED = 20


@dataclass(frozen=True)
class BadImage:
    """An image that cannot be decoded, and why."""

    split: str
    index: int
    file: str
    reason: str


def check_image(record: dict) -> str | None:
    """``None`` if the image fully decodes to RGB; otherwise the reason it cannot be used."""
    path = record.get("path")
    data = record.get("bytes")
    try:
        if data is None:
            if path is None:
                return "no image data"
            if os.path.getsize(path) == 0:
                return "empty file (0 bytes)"
            image = Image.open(path)
        else:
            if len(data) == 0:
                return "empty image (0 bytes)"
            image = Image.open(io.BytesIO(data))
        image.load()  # decodes every byte: truncated files fail here, not in verify()
        to_rgb(image)
    except Exception as exc:  # PIL raises many types for bad files; every one means "unusable"
        return f"{type(exc).__name__}: {exc}"
    return None


def check_images(records: list[dict]) -> list[tuple[str | None, str | None]]:
    """Each record's path and ``check_image`` reason."""
    return [(record.get("path"), check_image(record)) for record in records]


def scan_split(name: str, split: Dataset, memo_dir: Path | None = None) -> list[BadImage]:
    """Decode every image of ``split`` once, in parallel (``map_undecoded``); the result is remembered (by the
    split's content fingerprint)."""
    memo = memo_dir / f"{split_fingerprint(split)}.json" if memo_dir is not None else None
    if memo is not None and memo.is_file():
        return [BadImage(**b) for b in json.loads(memo.read_text())]
    bad = [
        BadImage(name, start + k, path or f"{name}[{start + k}]", reason)
        for start, found in map_undecoded(split, check_images)
        for k, (path, reason) in enumerate(found)
        if reason is not None
    ]
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps([asdict(b) for b in bad]))
        os.replace(tmp, memo)
    return bad


def drop_bad_images(
    dsd: DatasetDict, skip_bad: bool, memo_dir: Path | None = None
) -> tuple[DatasetDict, list[BadImage]]:
    """Fail listing every unusable image, or (``skip_bad``) drop them and return what was dropped."""
    bad = [b for name, split in dsd.items() for b in scan_split(name, split, memo_dir)]
    if not bad:
        return dsd, []
    if not skip_bad:
        listed = "\n".join(f"  {b.file}: {b.reason}" for b in bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DataError(
            f"{len(bad)} image(s) cannot be read:\n{listed}{more}\n"
            f"Fix or remove them, or set data.skip_bad=true to skip them (they are listed in metrics.json)."
        )
    out = {}
    for name, split in dsd.items():
        drop = {b.index for b in bad if b.split == name}
        out[name] = split.select([i for i in range(len(split)) if i not in drop]) if drop else split
    return DatasetDict(out), bad


def check_image_folder(root: Path, image_suffixes: set[str]) -> list[str]:
    """Problems an ImageFolder loader would silently hide; returns notes about ignored non-image files.

    Empty class folders raise (the class would silently vanish); non-image files are ignored and reported.
    """
    ignored, classes = [], set()
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        files = [f for f in folder.iterdir() if f.is_file()]
        subdirs = [d for d in folder.iterdir() if d.is_dir()]
        images = [f for f in files if f.suffix.lower() in image_suffixes]
        ignored += [str(f) for f in files if f.suffix.lower() not in image_suffixes and not f.name.startswith(".")]
        if not images and not subdirs:
            raise DataError(
                f"class folder {folder} holds no images; remove it or add images (an empty class cannot be learned)."
            )
        if images:
            classes.add(folder.name)
    if len(classes) < 2:
        raise DataError(
            f"data.path={root}: found a single class folder ({sorted(classes) or 'none'}); an ImageFolder needs one "
            f"subfolder per class (DIR/<class>/*.jpg or DIR/<split>/<class>/*.jpg) and at least two classes."
        )
    notes = []
    if ignored:
        notes.append(f"ignored {len(ignored)} non-image file(s), e.g. {', '.join(ignored[:3])}")
    return notes


def check_classes(dsd: DatasetDict) -> None:
    """At least two classes in train, and no class in validation/test that train never shows."""
    import numpy as np

    names = dsd["train"].features["label"].names
    train_classes = set(np.unique(label_array(dsd["train"])).tolist())
    if len(train_classes) < 2:
        raise DataError(
            f"the training split has a single class ({[names[c] for c in train_classes]}); a classifier needs at "
            f"least two. Check data.path points at the folder whose subfolders are the classes."
        )
    for split in ("validation", "test"):
        if split in dsd:
            unseen = set(np.unique(label_array(dsd[split])).tolist()) - train_classes
            if unseen:
                raise DataError(
                    f"the {split} split has class(es) {sorted(names[c] for c in unseen)} that the training split "
                    f"lacks; add training images for them or remove them from {split}."
                )
