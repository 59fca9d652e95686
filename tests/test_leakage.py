"""Leakage check: copies of training images in the test split are counted (exact and near), reported in
metrics.json with a CSV of the pairs, and dropped on request; the near-duplicate threshold holds on real photos."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from fmtransfer.bench.scale import pil_thumbnail
from fmtransfer.cli.config import compose_config
from fmtransfer.data import images, leakage, prepare_data
from fmtransfer.data.leakage import DEFAULT_THRESHOLD, image_signatures, normalized
from fmtransfer.data.sources import load_image_folder
from fmtransfer.data.validate import scan_split
from fmtransfer.regimes import run_regime

from .conftest import shared_dataset


def _resized_jpeg(path: Path) -> bytes:
    """The photo resized to 90 % and re-saved as JPEG quality 85: a near copy."""
    image = Image.open(path).convert("RGB")
    image = image.resize((round(image.width * 0.9), round(image.height * 0.9)), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _thumbnails(encoded: list[bytes]) -> np.ndarray:
    return normalized(image_signatures([{"bytes": data, "path": None} for data in encoded])[2])


def test_the_near_duplicate_threshold_separates_copies_from_distinct_photos():
    """On real photos (hymenoptera train, 244 images): every resized + re-encoded copy correlates above the default
    threshold with its original; no two distinct photos of the same class do."""
    files = sorted(shared_dataset("hymenoptera").joinpath("train").rglob("*.jpg"))
    thumbs = _thumbnails([f.read_bytes() for f in files])
    copies = _thumbnails([_resized_jpeg(f) for f in files[::8]])
    assert (np.einsum("ij,ij->i", thumbs[::8], copies) >= DEFAULT_THRESHOLD).all()
    classes = np.array([f.parent.name for f in files])
    same = (classes[:, None] == classes[None, :]) & ~np.eye(len(files), dtype=bool)
    assert (thumbs @ thumbs.T)[same].max() < DEFAULT_THRESHOLD


def test_copies_in_the_test_split_are_counted_and_dropped(tmp_path):
    """A copy of hymenoptera with 5 training images copied into its test folder and 5 more resized and re-encoded:
    exact +5, near +5 against the unmodified copy; drop_from_test removes all 10 from the test split."""
    source = shared_dataset("hymenoptera")
    clean, leaky = tmp_path / "clean", tmp_path / "leaky"
    shutil.copytree(source, clean)
    shutil.copytree(source, leaky)
    train = sorted((source / "train").rglob("*.jpg"))
    for k, path in enumerate(train[::20][:10]):
        dest = leaky / "val" / path.parent.name
        if k < 5:
            shutil.copy(path, dest / f"copy_{k}.jpg")
        else:
            (dest / f"near_{k}.jpg").write_bytes(_resized_jpeg(path))
    common = dict(rename={"validation": "test"}, val_fraction=0.2, cache_dir=str(tmp_path / "hf"))
    before = prepare_data(str(clean), **common).leakage.counts()
    leaked = prepare_data(str(leaky), **common)
    after = leaked.leakage.counts()
    assert after["exact"] == before["exact"] + 5 and after["near"] >= before["near"] + 5
    assert len(leaked.splits["test"]) == 153 + 10
    dropped = prepare_data(str(leaky), **common, dedupe="drop_from_test")
    names = {Path(p["path"]).name for p in dropped.splits["test"].cast_column("image", _raw())["image"]}
    assert not {n for n in names if n.startswith(("copy_", "near_"))}
    assert len(dropped.splits["test"]) == 163 - dropped.leakage.dropped["test"] <= 153
    kept_train = prepare_data(str(leaky), **common, dedupe="drop_from_train")
    # The originals sit in train or in the validation split carved from it: those rows go instead.
    assert len(kept_train.splits["test"]) == 163 and sum(kept_train.leakage.dropped.values()) >= 10


def _raw():
    from datasets import Image as ImageFeature

    return ImageFeature(decode=False)


def test_a_run_reports_leakage_in_metrics_and_drops_on_request(tmp_path, tiny_overrides):
    """scikit-learn's digits hold near-identical scans across the test and train splits: a run says how many, writes
    the pairs, and with data.dedupe=drop_from_test evaluates without them."""
    metrics = run_regime(compose_config(tiny_overrides), tmp_path / "run")
    leak = metrics["leakage"]
    assert leak["near"] >= 1 and leak["dedupe"] == "off" and leak["dropped"] == {}
    rows = list(csv.DictReader((tmp_path / "run" / leak["pairs"]).read_text().splitlines()))
    assert len(rows) == leak["exact"] + leak["near"]
    test_pairs = {int(r["row"]) for r in rows if r["split"] == "test"}
    dropped = run_regime(compose_config([*tiny_overrides, "data.dedupe=drop_from_test"]), tmp_path / "dropped")
    assert dropped["leakage"]["dropped"]["test"] == len(test_pairs)
    assert dropped["split_sizes"]["test"] == metrics["split_sizes"]["test"] - len(test_pairs)
    assert sum(c["support"] for c in dropped["test"]["per_class"].values()) == dropped["split_sizes"]["test"]
    off = run_regime(compose_config([*tiny_overrides, "data.leakage.check=false"]), tmp_path / "off")
    assert off["leakage"] is None
    assert json.loads((tmp_path / "off" / "metrics.json").read_text())["leakage"] is None


def test_the_report_states_the_leakage_check():
    from fmtransfer.report.render import leakage_text

    found = {"exact": 2, "near": 3, "pairs": "leakage_pairs.csv", "threshold": 0.99, "dedupe": "drop_from_test"}
    text = leakage_text({**found, "dropped": {"test": 4}})
    assert "2 exact and 3 near-duplicate pairs" in text and "dropped 4 test image(s)" in text
    assert "kept (the numbers include them)" in leakage_text({**found, "dedupe": "off", "dropped": {}})
    assert "no held-out image is a copy" in leakage_text({**found, "exact": 0, "near": 0, "dropped": {}})
    assert "off" in leakage_text(None)


def test_the_faiss_index_finds_the_pairs_the_dense_search_finds():
    """Thumbnail-like unit vectors (smooth random images) with planted near copies (correlation ~0.995) and decoys
    just below the threshold (~0.98): the indexed search returns exactly the dense search's pairs and scores."""
    import pytest

    from fmtransfer.data.leakage import ThumbnailRows, block_means, search_mode, similar_pairs
    from fmtransfer.errors import ConfigError

    pytest.importorskip("faiss", reason="faiss-cpu is an optional extra (fmtransfer[scale])")
    rng = np.random.default_rng(0)
    smooth = rng.normal(size=(6000, 8, 8)).repeat(4, 1).repeat(4, 2).reshape(6000, -1)

    def unit(x):
        x = x - x.mean(1, keepdims=True)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    references = unit(smooth[:5000] + 0.3 * rng.normal(size=(5000, 1024)))
    planted = rng.permutation(5000)[:60]
    noise = unit(rng.normal(size=(60, 1024)))
    near = unit(references[planted] + 0.1 * noise)  # correlation ~0.995
    decoy = unit(references[planted[:20]] + 0.2 * noise[:20])  # ~0.98: below the threshold
    queries = np.concatenate([unit(smooth[5000:] + 0.3 * rng.normal(size=(1000, 1024))), near, decoy])
    dense = similar_pairs(queries, references, DEFAULT_THRESHOLD, "dense")
    assert sorted((r, c) for r, c, _ in dense) == [(1000 + k, int(p)) for k, p in enumerate(planted)]
    on_disk = ThumbnailRows(len(references))  # how a large split's thumbnails are kept
    on_disk.write(0, references)
    assert np.array_equal(on_disk.take(np.array([7, 3, 7, 4])), references[[7, 3, 7, 4]])
    levels = rng.integers(0, 256, size=(50, 1024), dtype=np.uint8)  # the check's own: gray levels, a byte a pixel
    as_levels = ThumbnailRows(len(levels), levels=True)
    as_levels.write(0, levels)
    assert np.array_equal(as_levels.take(np.array([9, 2, 9])), normalized(levels[[9, 2, 9]]))
    assert np.allclose(np.linalg.norm(as_levels.read(), axis=1), 1.0) and np.allclose(as_levels.read().mean(1), 0)
    indexed = similar_pairs(queries, on_disk, DEFAULT_THRESHOLD, "faiss")
    assert [(r, c) for r, c, _ in indexed] == [(r, c) for r, c, _ in dense]
    assert np.allclose([s for *_, s in indexed], [s for *_, s in dense], atol=1e-5)
    coarse = references.reshape(-1, 8, 4, 8, 4).sum(axis=(2, 4)).reshape(len(references), 64) / 4
    assert np.allclose(block_means(references), coarse, atol=1e-6)  # the index's projection: 8 x 8 block averages
    assert search_mode("auto", 9_999) == "dense" and search_mode("auto", 10_000) == "faiss"
    with pytest.raises(ConfigError, match=r"data\.leakage\.index=fast is not known"):
        search_mode("fast", 10)


def test_thumbnails_match_pil_for_every_kind_of_image_the_check_decodes(monkeypatch):
    """Smooth seeded pictures of odd sizes as RGB, grayscale and CMYK JPEGs (decoded by libjpeg) and RGBA and
    palette PNGs (by PIL): each thumbnail correlates >= 0.999 with PIL's; a flat image's is all zeros; decoding and
    resizing fewer images at a time, or the JPEGs by torchvision instead of simplejpeg (where installed), changes
    nothing."""
    rng = np.random.default_rng(0)
    encoded = []
    for k, kind in enumerate(["RGB", "L", "CMYK", "RGBA", "P"] * 2):
        h, w = [(61, 97), (64, 64), (200, 300), (333, 250)][k % 4]
        field = rng.uniform(0, 255, size=(h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
        image = Image.fromarray(field.astype(np.uint8)).convert(kind)
        buf = io.BytesIO()
        image.save(buf, "PNG" if kind in ("RGBA", "P") else "JPEG", quality=90)
        encoded.append(buf.getvalue())
    flat = io.BytesIO()
    Image.new("RGB", (40, 30), (90, 90, 90)).save(flat, "PNG")
    thumbs = _thumbnails([*encoded, flat.getvalue()])
    reference = np.stack([pil_thumbnail(Image.open(io.BytesIO(data))) for data in encoded])
    assert (np.einsum("ij,ij->i", thumbs[:-1], reference) >= 0.999).all()
    assert not thumbs[-1].any()
    monkeypatch.setattr(leakage, "DECODE_BYTES", 3_000)  # decoded and resized a few images at a time
    monkeypatch.setattr(leakage, "RESIZE_PIXELS", 10_000)
    assert np.array_equal(_thumbnails(encoded), thumbs[:-1])
    if leakage.simplejpeg is not None:  # made by the scale extra's decoder: torchvision's gives the same thumbnails
        monkeypatch.setattr(leakage, "simplejpeg", None)
        assert np.array_equal(_thumbnails(encoded), thumbs[:-1])
    # squares resized four at a time as channels: the same levels as one at a time, enlarged or reduced, any count
    for side, count in [(20, 1), (61, 3), (64, 4), (250, 5)]:
        squares = torch.from_numpy(rng.integers(0, 256, size=(count, side, side), dtype=np.uint8))
        one_by_one = F.interpolate(squares.unsqueeze(1), size=(32, 32), mode="bilinear", antialias=True)
        assert torch.equal(leakage.resized_squares(squares), one_by_one.squeeze(1))


def test_forked_workers_scan_and_sign_a_split_as_threads_do(tmp_path, monkeypatch):
    """Large splits are scanned and signed in forked processes: on hymenoptera's training images plus a truncated
    JPEG, read a few rows at a time so several batches are in flight, the processes report the same bad image and
    the same hashes, paths and thumbnails as threads."""
    source = shared_dataset("hymenoptera") / "train"
    shutil.copytree(source, tmp_path / "train")
    whole = next((tmp_path / "train" / "ants").glob("*.jpg")).read_bytes()
    (tmp_path / "train" / "ants" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    split = load_image_folder(str(tmp_path / "train"))["train"]
    monkeypatch.setattr(images, "READ_BATCH", 32)

    def scanned_and_signed(min_rows: int):
        monkeypatch.setattr(images, "PROCESS_MIN_ROWS", min_rows)
        with images.undecoded_workers(2, len(split)) as pool:
            assert isinstance(pool, ProcessPoolExecutor) == (min_rows == 0)
        bad = scan_split("train", split)
        found = leakage.signatures(split.select(sorted(set(range(len(split))) - {b.index for b in bad})), workers=2)
        return bad, found.hashes, found.paths, found.thumbs.read(), found.thumbs.coarse

    bad, *signed = scanned_and_signed(0)
    assert [Path(b.file).name for b in bad] == ["cut.jpg"] and "truncated" in bad[0].reason
    expected_bad, *expected = scanned_and_signed(10**9)
    assert bad == expected_bad and signed[:2] == expected[:2] and np.array_equal(signed[2], expected[2])
    # the index's block averages, made by the workers with the thumbnails: 8 x 8 blocks of 4 x 4 pixels, each sum / 4
    blocks = signed[2].reshape(-1, 8, 4, 8, 4).sum(axis=(2, 4)).reshape(len(signed[2]), 64) / 4
    assert np.array_equal(signed[3], expected[3]) and np.allclose(signed[3], blocks, atol=1e-6)
    assert len(signed[0]) == len(split) - 1 and len(set(signed[0])) == len(signed[0])


def worker_pid(records: list[dict]) -> int:
    return os.getpid()


def undecoded_rows(records: list[dict]) -> list[dict]:
    return records


def test_map_undecoded_hands_each_row_in_the_splits_order(monkeypatch):
    """Workers get the rows of a shuffled, selected split (a row mapping over the table) in its order, images stored
    as bytes and as paths alike, chunk by chunk: what Hugging Face's own row access gives."""
    files = sorted(str(p) for p in (shared_dataset("hymenoptera") / "val").rglob("*.jpg"))[:12]
    stored = [{"bytes": Path(f).read_bytes(), "path": None} for f in files[:6]]
    table = Dataset.from_dict(
        {"image": stored + [{"bytes": None, "path": f} for f in files[6:]], "label": list(range(12))},
        features=Features({"image": ImageFeature(), "label": Value("int64")}),
    )
    split = table.shuffle(seed=0).select([9, 2, 11, 0, 5, 7, 3])
    monkeypatch.setattr(images, "PROCESS_MIN_ROWS", 0)
    monkeypatch.setattr(images, "READ_BATCH", 4)
    mapped = list(images.map_undecoded(split, undecoded_rows, workers=2))
    assert [first for first, _ in mapped] == [0, 2, 4, 6]
    expected = split.cast_column("image", ImageFeature(decode=False))["image"]
    assert [row for _, rows in mapped for row in rows] == expected


def test_maps_inside_shared_workers_run_in_one_pool_and_files_read_whole(tmp_path, monkeypatch):
    """A data setup scans and signs several splits with one pool: every map inside ``shared_workers`` runs in the
    same two forked processes (none started before the first map); ``read_file`` returns a file's bytes whole,
    empty or larger than one read."""
    split = load_image_folder(str(shared_dataset("hymenoptera") / "val"))["train"]
    monkeypatch.setattr(images, "PROCESS_MIN_ROWS", 0)
    monkeypatch.setattr(images, "READ_BATCH", 16)
    with images.shared_workers(len(split), workers=2):
        pool = images.SHARED_POOL.get()
        assert isinstance(pool, ProcessPoolExecutor) and not pool._processes
        first = {pid for _, pid in images.map_undecoded(split, worker_pid, workers=2)}
        second = {pid for _, pid in images.map_undecoded(split.select(range(40)), worker_pid, workers=2)}
        assert images.SHARED_POOL.get() is pool and len(pool._processes) == 2
        assert first | second <= set(pool._processes) and os.getpid() not in first
    assert images.SHARED_POOL.get() is None
    for size in (0, 1, 3 << 20):
        (tmp_path / f"{size}.bin").write_bytes(data := os.urandom(size))
        assert images.read_file(str(tmp_path / f"{size}.bin")) == data
