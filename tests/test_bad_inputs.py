"""Messy folders: every bad input ends in a clear message naming the file/option, or a recorded skip."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmtransfer.cli.config import compose_config
from fmtransfer.data import prepare_data
from fmtransfer.errors import DataError
from fmtransfer.regimes import run_regime

from .conftest import digits_images, write_image_folder


def _jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "imgs", {"train": 8}, classes=2)


def _add_bad_files(folder: Path) -> dict[str, str]:
    real = digits_images(1, 1)[0][0]
    bad = {
        "garbage.jpg": "random bytes named .jpg",
        "truncated.jpg": "a real JPEG cut in half",
        "empty.png": "zero bytes",
    }
    target = folder / "train" / "digit0"
    (target / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    full = _jpeg_bytes(real.resize((64, 64)))
    (target / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (target / "empty.png").write_bytes(b"")
    return bad


def test_unreadable_images_are_all_listed(folder):
    bad = _add_bad_files(folder)
    with pytest.raises(DataError) as err:
        prepare_data(str(folder))
    message = str(err.value)
    assert f"{len(bad)} image(s) cannot be read" in message
    for name in bad:
        assert name in message
    assert "data.skip_bad=true" in message


def test_skip_bad_drops_and_records_them(folder, tmp_path):
    bad = _add_bad_files(folder)
    data = prepare_data(str(folder), skip_bad=True, cache_dir=str(tmp_path / "hf"))
    assert sorted(Path(b.file).name for b in data.skipped) == sorted(bad)
    assert sum(data.sizes().values()) == 16
    assert any("skipped 3 unreadable" in n for n in data.notes)
    # The scan is remembered: a second prepare does not decode again but gives the same answer.
    assert list((tmp_path / "hf" / "image_scans").glob("*.json"))
    again = prepare_data(str(folder), skip_bad=True, cache_dir=str(tmp_path / "hf"))
    assert again.skipped == data.skipped


def test_unusual_but_valid_images_train_end_to_end(folder, tmp_path, tiny_overrides):
    """GIF (animated), CMYK, 16-bit, RGBA, palette and 2x2-pixel images all go through the whole run."""
    base = digits_images(1, 2)
    for cls, (img, _) in zip(("digit0", "digit1"), base[:1] + base[-1:], strict=True):
        d = folder / "train" / cls
        rgb = img.convert("RGB")
        frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
        frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
        rgb.convert("CMYK").save(d / "cmyk.jpg")
        Image.fromarray(np.asarray(img, dtype=np.uint16) * 257).save(d / "sixteen.png")
        rgba = rgb.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(d / "rgba.png")
        rgb.convert("P").save(d / "palette.png")
        rgb.resize((2, 2)).save(d / "tiny.png")
    overrides = [o for o in tiny_overrides if not o.startswith("data.shots")] + [f"data.path={folder}"]
    metrics = run_regime(compose_config(overrides), tmp_path / "run")
    assert metrics["split_sizes"]["train"] + metrics["split_sizes"]["validation"] + metrics["split_sizes"]["test"] == 28
    assert metrics["skipped_images"] == []


def test_non_image_files_are_ignored_and_reported(folder):
    (folder / "train" / "digit0" / "notes.txt").write_text("not an image")
    data = prepare_data(str(folder))
    assert any("ignored 1 non-image file" in n and "notes.txt" in n for n in data.notes)


def test_empty_class_folder_is_named(folder):
    (folder / "train" / "digit7").mkdir()
    with pytest.raises(DataError, match=r"class folder .*digit7 holds no images"):
        prepare_data(str(folder))


def test_class_only_in_test_is_reported(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"train": 6, "test": 3}, classes=2)
    extra = root / "test" / "digit5"
    extra.mkdir()
    digits_images(1, 1)[0][0].save(extra / "x.png")
    with pytest.raises(DataError, match=r"test split has class\(es\) \['digit5'\] that the training split lacks"):
        prepare_data(str(root))


def test_one_class_dataset_is_reported(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"train": 10, "test": 4}, classes=2)
    import shutil

    for split in ("train", "test"):
        shutil.rmtree(root / split / "digit1")
    with pytest.raises(DataError, match="single class"):
        prepare_data(str(root))


def test_nan_loss_stops_with_a_message_naming_the_step(tmp_path, tiny_overrides):
    cfg = compose_config([*tiny_overrides, "head=linear", "head.lr=1e30", "head.epochs=50"])
    with pytest.raises(Exception, match=r"training loss became (nan|inf).* at epoch \d+, step \d+"):
        run_regime(cfg, tmp_path / "run")


def test_metrics_record_skipped_files(folder, tmp_path, tiny_overrides):
    _add_bad_files(folder)
    overrides = [o for o in tiny_overrides if not o.startswith("data.shots")]
    metrics = run_regime(compose_config([*overrides, f"data.path={folder}", "data.skip_bad=true"]), tmp_path / "r")
    assert len(metrics["skipped_images"]) == 3
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["skipped_images"] == metrics["skipped_images"]
