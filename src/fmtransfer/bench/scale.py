"""The scale benchmark (``make bench-scale``): seeded synthetic image folders of 100,000s of images with planted exact
and near duplicates, run through ``make train`` (frozen) and a 3-fold frozen-only ``make compare``; peak RSS, cache
disk and time of each, and the leakage check against its dense search and against the check as it was.

Not a test: it takes minutes to hours and writes gigabytes. Its figures go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from fmtransfer.data.images import encoded_bytes
from fmtransfer.data.leakage import (
    DEFAULT_THRESHOLD,
    THUMB,
    Signatures,
    ThumbnailRows,
    find_leakage,
    signatures,
    similar_pairs,
)

log = logging.getLogger(__name__)

CLASSES = 10
COMPLETE = ".complete"  # written last: a folder without it is regenerated
PLANTED = "planted.json"


def synthetic_image(seed: int, index: int, size: int) -> tuple[int, Image.Image]:
    """Image ``index`` of a seeded set and its class: a smooth random colour field of its own (what makes every image
    distinct) over its class's faint grating (what a classifier can learn)."""
    rng = np.random.default_rng([seed, index])
    label = index % CLASSES
    field = rng.normal(size=(6, 6, 3)).astype(np.float32)
    coarse = Image.fromarray(np.uint8(np.clip(128 + 40 * field, 0, 255)), "RGB").resize((size, size), Image.BICUBIC)
    y, x = np.mgrid[0:size, 0:size] / size
    angle = np.pi * label / CLASSES
    grating = 18 * np.sin(2 * np.pi * 4 * (x * np.cos(angle) + y * np.sin(angle)))
    pixels = np.asarray(coarse, dtype=np.float32) + grating[..., None]
    return label, Image.fromarray(np.uint8(np.clip(pixels, 0, 255)), "RGB")


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def near_copy(data: bytes) -> bytes:
    """A near duplicate as docs/leakage.md measures one: resized to 90 % and re-saved at JPEG quality 85."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        small = image.resize((round(image.width * 0.9), round(image.height * 0.9)), Image.BICUBIC)
    return jpeg_bytes(small, 85)


def write_images(root: Path, seed: int, indices: range, size: int) -> None:
    for i in indices:
        label, image = synthetic_image(seed, i, size)
        (root / f"class{label}" / f"{i:07d}.jpg").write_bytes(jpeg_bytes(image))


def write_synthetic_dataset(
    root: Path, n: int, size: int = 64, seed: int = 0, duplicates: float = 0.01, workers: int | None = None
) -> dict:
    """An ImageFolder of ``n`` images (``class<k>/<index>.jpg``): ``n`` distinct seeded images, of which a share
    ``duplicates`` are then overwritten by copies of other images of their class (half exact byte copies, half near
    copies). Returns the planted pairs ``{"exact": [[copy, original], ...], "near": [...]}`` (file names); a folder
    already complete for the same arguments is reused."""
    settings = {"n": n, "size": size, "seed": seed, "duplicates": duplicates}
    if (root / COMPLETE).is_file() and json.loads((root / COMPLETE).read_text()) == settings:
        return json.loads((root / PLANTED).read_text())
    shutil.rmtree(root, ignore_errors=True)
    for k in range(CLASSES):
        (root / f"class{k}").mkdir(parents=True)
    workers = workers or len(os.sched_getaffinity(0))
    step = -(-n // (workers * 8))
    chunks = [range(s, min(s + step, n)) for s in range(0, n, step)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(write_images, [root] * len(chunks), [seed] * len(chunks), chunks, [size] * len(chunks)))
    rng = np.random.default_rng([seed, n])
    copies = rng.permutation(n)[: round(n * duplicates)]
    kept = np.setdiff1d(np.arange(n), copies)  # originals are never overwritten themselves
    planted: dict[str, list[list[str]]] = {"exact": [], "near": []}
    for k, copy in enumerate(copies.tolist()):
        label = copy % CLASSES
        same_class = kept[kept % CLASSES == label]
        original = int(same_class[rng.integers(len(same_class))])
        source = root / f"class{label}" / f"{original:07d}.jpg"
        target = root / f"class{label}" / f"{copy:07d}.jpg"
        kind = "exact" if k % 2 == 0 else "near"
        target.write_bytes(source.read_bytes() if kind == "exact" else near_copy(source.read_bytes()))
        planted[kind].append([target.name, source.name])
    (root / PLANTED).write_text(json.dumps(planted))
    (root / COMPLETE).write_text(json.dumps(settings))
    return planted


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def measured(command: list[str], log_file: Path) -> dict:
    """Run ``command`` under GNU time: its wall seconds and peak resident memory (MiB, the largest process)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as timing, log_file.open("w") as out:
        began = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", timing.name, *command], stdout=out, stderr=out)
        seconds = time.perf_counter() - began
        peak_kib = int(Path(timing.name).read_text().split()[-1])
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}); its log: {log_file}")
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(peak_kib / 1024, 1)}


def cache_entries(cache_dir: Path) -> dict:
    """Cache entries and their bytes: ``{"entries", "views", "bytes"}``."""
    entries = [p for p in cache_dir.glob("*/*") if p.is_dir() and not p.name.startswith(".")]
    views = [p for p in entries if (p / "rows.npy").is_file()]
    return {"entries": len(entries), "views": len(views), "bytes": folder_bytes(cache_dir)}


def head_tensor_bytes(run_dir: Path, splits: tuple[str, ...] = ("train",)) -> int:
    """The frozen head's training tensors: the pooled float32 features of its levels for every image of ``splits``
    (a comparison's refit trains on its pool: train and validation)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = (run_dir / "config.yaml").read_text()
    manifest = json.loads((Path(metrics["cache"]["entries"]["train"]) / "manifest.json").read_text())
    levels = manifest["levels"]
    wanted = [n for n in levels if f"- {n}" in config or "levels: all" in config]
    channels = sum(levels[n]["shape"][0] for n in wanted or levels)
    return sum(int(metrics["split_sizes"].get(split, 0)) for split in splits) * channels * 4


def scale_checks(runs: list[dict], leakage: dict | None) -> dict:
    """The scale issue's checks from one bench run: peak RSS minus the head's training tensors, its growth from the
    smallest to the largest run (target: within 10 %), a comparison's cache disk against the base entries
    ``make train`` left (target: about 1, no per-fold copies), and the leakage check's speed against the check as it
    was (target: 10x) with its recall and extra pairs."""
    out: dict = {}
    if len(runs) >= 2:
        small, large = min(runs, key=lambda r: r["images"]), max(runs, key=lambda r: r["images"])
        for step in ("train", "compare"):
            a, b = (r[step]["peak_rss_mib"] - r[step]["head_tensor_mib"] for r in (small, large))
            out[f"{step}_rss_minus_head_growth"] = round(b / a - 1, 3)
    for run in runs:
        base = run["train"]["cache"]["bytes"]
        out[f"compare_cache_over_base_{run['images']}"] = round(run["compare"]["cache"]["bytes"] / base, 4)
    if leakage:
        out["leakage_speedup_over_reference"] = leakage["check_speedup_over_reference"]
        for kind in ("exact", "near"):
            out[f"leakage_{kind}_recall"] = leakage[f"faiss_{kind}_recall"]
            out[f"leakage_{kind}_extra"] = leakage[f"faiss_{kind}_extra"]
    return out


def latest(folder: Path) -> Path:
    return max((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)


def scale_run(n: int, work: Path, size: int, python: str) -> dict:
    """Generate ``n`` images, then ``make train`` (frozen) and a 3-fold frozen-only ``make compare`` on them."""
    data = work / f"synthetic-{n}"
    began = time.perf_counter()
    write_synthetic_dataset(data, n, size)
    generate_s = time.perf_counter() - began
    data_dir = work / f"data-{n}"
    shutil.rmtree(data_dir, ignore_errors=True)
    common = [
        f"data.path={data}",
        f"data.image_size={size}",
        f"paths.data_dir={data_dir}",
        "trainer.progress_bar=false",
    ]
    train = measured(
        [python, "-m", "fmtransfer.cli.train", *common, "regime=frozen", f"hydra.run.dir={data_dir}/train-run"],
        work / f"train-{n}.log",
    )
    cache = data_dir / "cache"
    after_train = cache_entries(cache)
    head = head_tensor_bytes(data_dir / "train-run")
    compare = measured(
        [
            python, "-m", "fmtransfer.cli.compare", *common, "compare.regimes=[frozen]", "compare.seeds=[0]",
            "compare.shots=[all]", "compare.selection.folds=3", "compare.selection.min_scored=1000000000",
            "compare.preset=cpu",
            'compare.sweep.frozen=[["head.name=multilayer","head.levels=all","head.lr=0.01"]]',
            f"compare.out_dir={data_dir}/compare", "compare.name=scale", f"hydra.run.dir={data_dir}/compare-run",
        ],
        work / f"compare-{n}.log",
    )  # fmt: skip
    return {
        "images": n,
        "image_size": size,
        "generate_s": round(generate_s, 1),
        "dataset_bytes": folder_bytes(data),
        "train": {**train, "head_tensor_mib": round(head / 2**20, 1), "cache": after_train},
        "compare": {
            **compare,
            "head_tensor_mib": round(head_tensor_bytes(data_dir / "train-run", ("train", "validation")) / 2**20, 1),
            "cache": cache_entries(cache),
        },
    }


def reference_signatures(split: Dataset) -> Signatures:
    """The leakage check's signatures as it made them before it was built for scale (code 9c980e7), the reference
    the scale issue measures against: every file read twice (for its hash, then decoded by Hugging Face datasets),
    one image at a time, each thumbnail made by PIL."""
    undecoded = split.cast_column("image", ImageFeature(decode=False))["image"]
    hashes = [hashlib.blake2b(encoded_bytes(image), digest_size=16).hexdigest() for image in undecoded]
    thumbs = [pil_thumbnail(image) for image in split["image"]]
    return Signatures(hashes, [image.get("path") or "" for image in undecoded], ThumbnailRows.of(np.stack(thumbs)))


def pil_thumbnail(image: Image.Image) -> np.ndarray:
    """Luma, centre square, 32 x 32 bilinear, mean removed, unit norm: as PIL makes it."""
    gray = image.convert("L")
    side = min(gray.size)
    left, top = (gray.width - side) // 2, (gray.height - side) // 2
    small = gray.crop((left, top, left + side, top + side)).resize((THUMB, THUMB), Image.BILINEAR)
    a = np.asarray(small, dtype=np.float32).ravel()
    a -= a.mean()
    norm = float(np.linalg.norm(a))
    return a / norm if norm > 0 else a


def leakage_run(n: int, work: Path, size: int, repeats: int = 3) -> dict:
    """The leakage check on ``n`` synthetic images (80 % / 20 % as reference / query splits): the whole check as it
    was (``reference_signatures``, dense search), and as it is with the dense and with the indexed search, the three
    in turn ``repeats`` times (times: medians, every run's in ``*_runs_s``); each search alone on the same
    thumbnails; the pairs found against the reference's."""
    from fmtransfer.data.sources import load_image_folder

    data = work / f"synthetic-{n}"
    planted = write_synthetic_dataset(data, n, size)
    pool = load_image_folder(str(data))["train"]
    order = np.random.default_rng(0).permutation(len(pool))
    splits = {
        "train": pool.select(np.sort(order[len(pool) // 5 :])),
        "test": pool.select(np.sort(order[: len(pool) // 5])),
    }
    out: dict = {"images": n, "references": len(splits["train"]), "queries": len(splits["test"])}
    found = {}
    checks = {
        "reference": {"index": "dense", "sign": reference_signatures},
        "dense": {"index": "dense"},
        "faiss": {"index": "faiss"},
    }
    runs: dict[str, list[float]] = {name: [] for name in checks}
    for _ in range(repeats):  # in turn: this machine's speed drifts within minutes
        for name, how in checks.items():
            began = time.perf_counter()
            report = find_leakage(splits, **how)
            runs[name].append(round(time.perf_counter() - began, 3))
            found[name] = {(p.kind, p.row, p.other_row) for p in report.pairs}
            out[f"{name}_pairs"] = report.counts()
    for name, times in runs.items():
        out[f"check_{name}_s"] = round(float(np.median(times)), 2)
        out[f"check_{name}_runs_s"] = times
    began = time.perf_counter()
    thumbs = {name: signatures(split).thumbs for name, split in splits.items()}
    out["signatures_s"] = round(time.perf_counter() - began, 2)
    for index in ("dense", "faiss"):
        began = time.perf_counter()
        similar_pairs(thumbs["test"], thumbs["train"], DEFAULT_THRESHOLD, index)
        out[f"search_{index}_s"] = round(time.perf_counter() - began, 3)
    for kind in ("exact", "near"):
        reference = {p for p in found["reference"] if p[0] == kind}
        for name in ("dense", "faiss"):
            mine = {p for p in found[name] if p[0] == kind}
            out[f"{name}_{kind}_recall"] = round(len(reference & mine) / max(1, len(reference)), 4)
            out[f"{name}_{kind}_extra"] = len(mine - reference)
    out["planted"] = {k: len(v) for k, v in planted.items()}
    out["check_speedup_over_reference"] = round(out["check_reference_s"] / out["check_faiss_s"], 2)
    out["check_speedup_over_dense"] = round(out["check_dense_s"] / out["check_faiss_s"], 2)
    out["search_speedup"] = round(out["search_dense_s"] / out["search_faiss_s"], 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="make bench-scale", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 200_000], help="images per run")
    parser.add_argument("--leakage-images", type=int, default=20_000, help="images of the leakage comparison (0: skip)")
    parser.add_argument("--leakage-repeats", type=int, default=3, help="runs of each leakage check (medians)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("data/bench-scale"), help="datasets, caches and logs")
    parser.add_argument("--out", type=Path, default=Path("logs/bench-scale.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench-scale] %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(["make bench-scale", *(argv or sys.argv[1:])]), "runs": []}
    if args.leakage_images:
        results["leakage"] = leakage_run(args.leakage_images, args.work, args.image_size, args.leakage_repeats)
        log.info(json.dumps(results["leakage"]))
    for n in args.sizes:
        results["runs"].append(scale_run(n, args.work, args.image_size, sys.executable))
        log.info(json.dumps(results["runs"][-1]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    results["checks"] = scale_checks(results["runs"], results.get("leakage"))
    log.info(json.dumps(results["checks"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    log.info(f"written {args.out}")


if __name__ == "__main__":
    main()
