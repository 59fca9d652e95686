"""Leakage check: copies of training images in the test split are counted (exact and near), reported in
metrics.json with a CSV of the pairs, and dropped on request; the near-duplicate threshold holds on real photos."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from fmtransfer.cli.config import compose_config
from fmtransfer.data import prepare_data
from fmtransfer.data.leakage import DEFAULT_THRESHOLD, thumbnail
from fmtransfer.regimes import run_regime

from .conftest import shared_dataset


def _resized_jpeg(path: Path) -> Image.Image:
    """The photo resized to 90 % and re-saved as JPEG quality 85: a near copy."""
    image = Image.open(path).convert("RGB")
    image = image.resize((round(image.width * 0.9), round(image.height * 0.9)), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    buf.seek(0)
    return Image.open(buf)


def test_the_near_duplicate_threshold_separates_copies_from_distinct_photos():
    """On real photos (hymenoptera train, 244 images): every resized + re-encoded copy correlates above the default
    threshold with its original; no two distinct photos of the same class do."""
    files = sorted(shared_dataset("hymenoptera").joinpath("train").rglob("*.jpg"))
    thumbs = np.stack([thumbnail(Image.open(f)) for f in files])
    copies = np.stack([thumbnail(_resized_jpeg(f)) for f in files[::8]])
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
            _resized_jpeg(path).save(dest / f"near_{k}.jpg")
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
