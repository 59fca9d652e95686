"""Where labelled images come from: a registry of dataset sources, each loading a Hugging Face ``DatasetDict``.

Every source returns splits with exactly two columns, ``image`` (an ``Image`` feature) and ``label`` (a
``ClassLabel``), so later stages never care where the images came from.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset

from fmtransfer.data.validate import check_image_folder
from fmtransfer.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# Directory names the Hugging Face loaders map onto the canonical split names.
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class DataSource:
    """How to load one kind of dataset location."""

    name: str
    load: Callable[[str, str | None], DatasetDict]
    description: str = ""
    # Preprocessing that suits this source better than the backbone's defaults, e.g. {"image_size": 128,
    # "crop_pct": 1.0} for tiny images whose content reaches the border; used where the config says ``auto``.
    preferred_preprocessing: dict = field(default_factory=dict)
    # Checks of the raw location that the loader would hide (returns notes; raises DataError on problems).
    inspect: Callable[[str], list[str]] | None = None


def load_sklearn_digits(path: str, cache_dir: str | None = None) -> DatasetDict:
    """scikit-learn's bundled digits (1797 real 8x8 scans, 10 classes): the embedded, offline default."""
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; stretch to 0..255 so the image looks like an ordinary 8-bit grayscale scan.
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    data = {"image": [PILImage.fromarray(p, mode="L") for p in pixels], "label": digits.target.tolist()}
    return DatasetDict({"train": Dataset.from_dict(data, features=features)})


# Split folder / file names as the Hugging Face loaders read them (datasets.data_files: SPLIT_KEYWORDS, and a keyword
# counts when it stands alone or next to one of the separators "-._ " or a digit).
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SEP = r"[-._ 0-9]"
_DIR_SPLIT = {s: re.compile(rf"^(.*{_SEP})?({'|'.join(k)})({_SEP}.*)?$") for s, k in SPLIT_KEYWORDS.items()}
_FILE_SPLIT = {s: re.compile(rf"^(.*{_SEP})?({'|'.join(k)}){_SEP}.*$") for s, k in SPLIT_KEYWORDS.items()}
IMAGE_FOLDER_EXTENSIONS: set[str] | None = None


def image_folder_files(root: Path) -> dict[str, list[str]]:
    """``{split: sorted image paths}`` of an ImageFolder, found in one walk, split as the Hugging Face imagefolder
    loader splits it (a folder named for a split at any depth; else a file name; else everything is train), hidden
    and ``__``-prefixed paths skipped."""
    global IMAGE_FOLDER_EXTENSIONS
    if IMAGE_FOLDER_EXTENSIONS is None:
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

        IMAGE_FOLDER_EXTENSIONS = {e.lower() for e in ImageFolder.EXTENSIONS}
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        files += [os.path.join(folder, n) for n in names if not n.startswith((".", "__"))]
    files = sorted(f for f in files if os.path.splitext(f)[1].lower() in IMAGE_FOLDER_EXTENSIONS)
    relative = [Path(f).relative_to(root).parts for f in files]
    for patterns, part in ((_DIR_SPLIT, lambda parts: parts[:-1]), (_FILE_SPLIT, lambda parts: parts[-1:])):
        found = {
            split: [f for f, parts in zip(files, relative, strict=True) if any(p.match(x) for x in part(parts))]
            for split, p in patterns.items()
        }
        if any(found.values()):
            return {split: paths for split, paths in found.items() if paths}
    return {"train": files}


def load_image_folder(path: str, cache_dir: str | None = None) -> DatasetDict:
    """An ImageFolder (``DIR/<class>/*`` or ``DIR/<split>/<class>/*``) as the Hugging Face imagefolder loader reads
    it (same splits, order, labels and stored paths), listed in one walk: the loader's own file discovery globs
    every split pattern over the tree (minutes at 100,000 images). A folder with a metadata file goes to the loader."""
    root = Path(os.path.abspath(path))  # the loader stores absolute paths (not resolving symlinks)
    if any(root.glob("**/metadata.*")):
        return load_image_folder_with_hf(path, cache_dir)
    splits = image_folder_files(root)
    labels = {split: [os.path.basename(os.path.dirname(f)) for f in files] for split, files in splits.items()}
    names = sorted({name for split_labels in labels.values() for name in split_labels})
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    index = {name: i for i, name in enumerate(names)}
    out = {
        split: Dataset.from_dict({"image": files, "label": [index[n] for n in labels[split]]}, features=features)
        for split, files in splits.items()
    }
    return _standardise_columns(DatasetDict(out), path)


def load_image_folder_with_hf(path: str, cache_dir: str | None = None) -> DatasetDict:
    """The Hugging Face imagefolder loader's reading of ``path`` (what ``load_image_folder`` reproduces)."""
    return _load_with_hf("imagefolder", {"data_dir": path}, path, cache_dir)


def load_parquet_dir(path: str, cache_dir: str | None = None) -> DatasetDict:
    """Parquet split files: ``DIR/train.parquet``, ``DIR/validation.parquet`` (or ``val``), ``DIR/test.parquet``."""
    files = sorted(Path(path).glob("*.parquet")) if Path(path).is_dir() else [Path(path)]
    data_files: dict[str, list[str]] = {}
    for f in files:
        split = SPLIT_ALIASES.get(f.stem.lower().split("-")[0])
        if split is None and Path(path).is_dir():
            raise DataError(
                f"data.path={path}: cannot tell which split {f.name} holds. Name Parquet files after their split "
                f"(train.parquet, validation.parquet or val.parquet, test.parquet)."
            )
        data_files.setdefault(split or "train", []).append(str(f))
    return _load_with_hf("parquet", {"data_files": data_files}, path, cache_dir)


def load_hub_dataset(path: str, cache_dir: str | None = None) -> DatasetDict:
    """A dataset on the Hugging Face hub, by id (needs a network connection the first time)."""
    try:
        loaded = load_dataset(path, cache_dir=cache_dir)
    except Exception as exc:  # the hub client raises many types; all mean "not reachable / not found"
        raise DataError(
            f"data.path={path}: could not load this Hugging Face hub dataset ({type(exc).__name__}: {exc}). "
            f"Check the id and your network, or point data.path at a local ImageFolder or Parquet directory "
            f"(no folder {path} exists in {Path.cwd()})."
        ) from exc
    return _standardise_columns(loaded, path)


CSV_COLUMNS = {"image": "image", "label": "label", "split": "split"}


def load_csv_labels(path: str, cache_dir: str | None = None, columns: dict[str, str] | None = None) -> DatasetDict:
    """A CSV of labelled images: an image column (a path relative to the CSV's folder, or absolute), a label column
    (class names) and an optional split column (train, validation or val, test; rows without one go to train)."""
    import csv

    cols = {**CSV_COLUMNS, **(columns or {})}
    csv_path = Path(path)
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [cols[k] for k in ("image", "label") if cols[k] not in header]
        if missing:
            raise DataError(
                f"data.path={path}: no column {missing} in its header {header}; name the columns with "
                f"data.csv_columns.image / data.csv_columns.label."
            )
        rows = list(reader)
    if not rows:
        raise DataError(f"data.path={path}: the CSV has a header but no rows.")
    by_split: dict[str, tuple[list[str], list[str]]] = {}
    absent, unlabelled, bad_split = [], [], []
    for line, row in enumerate(rows, start=2):
        image = Path(row[cols["image"]].strip())
        image = image if image.is_absolute() else csv_path.parent / image
        label = (row.get(cols["label"]) or "").strip()
        split_name = (row.get(cols["split"]) or "").strip().lower() if cols["split"] in header else ""
        split = SPLIT_ALIASES.get(split_name) if split_name else "train"
        if not image.is_file():
            absent.append(f"line {line}: {image}")
        elif not label:
            unlabelled.append(f"line {line}")
        elif split is None:
            bad_split.append(f"line {line}: {split_name!r}")
        else:
            by_split.setdefault(split, ([], []))[0].append(str(image))
            by_split[split][1].append(label)
    for problems, what in (
        (absent, "images that do not exist"),
        (unlabelled, "rows without a label"),
        (bad_split, "split values other than train, validation/val, test"),
    ):
        if problems:
            raise DataError(f"data.path={path}: {len(problems)} {what}, e.g. {'; '.join(problems[:3])}.")
    names = sorted({label for _, labels in by_split.values() for label in labels})
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return DatasetDict(
        {
            split: Dataset.from_dict({"image": images, "label": [names.index(x) for x in labels]}, features=features)
            for split, (images, labels) in by_split.items()
        }
    )


def _load_with_hf(builder: str, kwargs: dict, path: str, cache_dir: str | None) -> DatasetDict:
    try:
        loaded = load_dataset(builder, cache_dir=cache_dir, **kwargs)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data.path={path}: could not read it as {builder} ({type(exc).__name__}: {exc}).") from exc
    return _standardise_columns(loaded, path)


def _standardise_columns(loaded: DatasetDict, path: str) -> DatasetDict:
    """Rename the image and label columns to ``image``/``label`` and drop everything else."""
    out = {}
    for split, ds in loaded.items():
        image_col = next((c for c, f in ds.features.items() if isinstance(f, Image)), None)
        label_col = next((c for c, f in ds.features.items() if isinstance(f, ClassLabel)), None)
        if label_col is None:
            label_col = next((c for c in ("label", "labels", "class", "target") if c in ds.features), None)
        if image_col is None or label_col is None:
            raise DataError(
                f"data.path={path}: split '{split}' needs an image column and a label column; found columns "
                f"{sorted(ds.features)} with features {dict(ds.features)}."
            )
        ds = ds.select_columns([image_col, label_col])
        ds = ds.rename_columns({c: n for c, n in ((image_col, "image"), (label_col, "label")) if c != n})
        if not isinstance(ds.features["label"], ClassLabel):
            ds = ds.class_encode_column("label")
        out[SPLIT_ALIASES.get(split, split)] = ds
    return DatasetDict(out)


DATA_SOURCES: dict[str, DataSource] = {
    "sklearn_digits": DataSource(
        "sklearn_digits",
        load_sklearn_digits,
        "scikit-learn's bundled digits (embedded, offline)",
        # 8x8 scans: 128 px holds all their detail at a third of 224 px's cost.
        {"image_size": 128},
    ),
    "imagefolder": DataSource(
        "imagefolder",
        load_image_folder,
        "local ImageFolder directory",
        inspect=lambda path: check_image_folder(Path(path), IMAGE_SUFFIXES),
    ),
    "parquet": DataSource("parquet", load_parquet_dir, "local Parquet split files"),
    "csv": DataSource("csv", load_csv_labels, "CSV of image paths and labels"),
    "hub": DataSource("hub", load_hub_dataset, "Hugging Face hub dataset id"),
}
EMBEDDED_PATHS = {"sklearn:digits": "sklearn_digits"}


def detect_source(path: str, fmt: str = "auto") -> DataSource:
    """Pick the source for ``data.path`` (``fmt`` forces one of ``DATA_SOURCES``)."""
    if fmt != "auto":
        if fmt not in DATA_SOURCES:
            raise DataError(f"data.format={fmt} is not known; use auto or one of {sorted(DATA_SOURCES)}.")
        return DATA_SOURCES[fmt]
    if path in EMBEDDED_PATHS:
        return DATA_SOURCES[EMBEDDED_PATHS[path]]
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".parquet":
        return DATA_SOURCES["parquet"]
    if p.is_file() and p.suffix.lower() == ".csv":
        return DATA_SOURCES["csv"]
    if p.is_dir():
        if any(p.glob("*.parquet")):
            return DATA_SOURCES["parquet"]
        if any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.rglob("*") if f.is_file()):
            return DATA_SOURCES["imagefolder"]
        raise DataError(
            f"data.path={path}: the directory holds neither images (ImageFolder: DIR/<class>/*.jpg or "
            f"DIR/<split>/<class>/*.jpg) nor Parquet split files."
        )
    if HUB_ID.match(path) and not path.startswith((".", "/", "~")):
        if p.parent.is_dir():
            # "data/myset" with data/ here is a mistyped folder far more often than a hub owner named "data".
            raise DataError(
                f"data.path={path}: no such folder (its parent {p.parent}/ exists here, in {Path.cwd()}). Check the "
                f"folder's name; for a Hugging Face hub dataset of that id, set data.format=hub."
            )
        return DATA_SOURCES["hub"]
    raise DataError(
        f"data.path={path}: no such file or directory. Give an ImageFolder directory, a directory of Parquet "
        f"split files, a CSV of image paths and labels, a Hugging Face hub id (owner/name), or 'sklearn:digits' for "
        f"the embedded default."
    )


# Loads already made by this process (a comparison runs ~100 training runs on one dataset): key -> (splits, notes).
_LOADED: OrderedDict[tuple, tuple[DatasetDict, list[str]]] = OrderedDict()
LOADED_KEPT = 4


def location_state(location: str, source: DataSource) -> tuple:
    """What a local location's load depends on beyond its arguments: every file's path, size and modification time
    (a CSV's own file; nothing for the embedded and hub sources, fixed by their names)."""
    if source.name in ("hub", "sklearn_digits"):
        return ()
    root = Path(location)
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    return tuple((str(f), st.st_size, st.st_mtime_ns) for f in files for st in (f.stat(),))


def load_image_dataset(
    path: str, fmt: str = "auto", cache_dir: str | None = None, csv_columns: dict[str, str] | None = None
) -> tuple[DatasetDict, DataSource, list[str]]:
    """Load ``path`` into a ``DatasetDict`` of ``image``/``label`` splits.

    Returns it with the source used and notes from inspecting the raw location (e.g. ignored files). A location
    loaded before by this process, with the same files (paths, sizes, modification times), is not read again.
    """
    source = detect_source(str(path), fmt)
    location = path if path in EMBEDDED_PATHS or source.name == "hub" else str(Path(path).expanduser())
    key = (source.name, location, cache_dir, tuple(sorted((csv_columns or {}).items())))
    key += location_state(location, source)
    if key not in _LOADED:
        _LOADED[key] = _load_checked(path, location, source, cache_dir, csv_columns)
    _LOADED.move_to_end(key)
    dsd, notes = _LOADED[key]
    while len(_LOADED) > LOADED_KEPT:
        _LOADED.popitem(last=False)
    return DatasetDict(dsd), source, list(notes)  # a new dict: callers may add or drop splits


def _load_checked(path: str, location: str, source: DataSource, cache_dir, csv_columns) -> tuple[DatasetDict, list]:
    notes = source.inspect(location) if source.inspect else []
    dsd = source.load(location, cache_dir, csv_columns) if source.name == "csv" else source.load(location, cache_dir)
    if not dsd:
        raise DataError(f"data.path={path}: no split found.")
    names = None
    for split, ds in dsd.items():
        if len(ds) == 0:
            raise DataError(f"data.path={path}: split '{split}' is empty.")
        split_names = ds.features["label"].names
        if names is not None and split_names != names:
            raise DataError(
                f"data.path={path}: split '{split}' has classes {split_names} but another split has {names}; "
                f"every split must have the same class folders."
            )
        names = split_names
    return dsd, notes
