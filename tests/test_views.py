"""Partial from cached augmented views: each view a reproducible draw of the training transform, every view served
once per V epochs, and a run on cached views reads no image."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from fmtransfer.backbone import SeededView, build_train_transform, resolve_data_config
from fmtransfer.data import images
from fmtransfer.heads import AugmentedViewsDataset
from tests.conftest import digits_images, write_image_folder

AUGMENT = {"scale": (0.08, 1.0), "hflip": 0.5, "color_jitter": 0.4}


def test_views_are_distinct_per_view_index_and_identical_for_the_same_seed():
    data_config = resolve_data_config({"input_size": (3, 32, 32), "crop_pct": 0.875}, image_size=32)
    transform = build_train_transform(data_config, AUGMENT)
    image = digits_images(1, 1)[0][0].convert("RGB")
    random.seed(123)
    torch.manual_seed(123)
    expected_next = (random.random(), torch.rand(1))
    random.seed(123)
    torch.manual_seed(123)
    views = [SeededView(transform, v, 4, seed=0)(image, 7) for v in range(4)]
    assert (random.random(), torch.rand(1)) == expected_next, "a view must leave the global random states alone"
    assert all(not torch.equal(views[a], views[b]) for a in range(4) for b in range(a + 1, 4))
    assert torch.equal(SeededView(transform, 2, 4, seed=0)(image, 7), views[2]), "same seed, view, image: same draw"
    assert not torch.equal(SeededView(transform, 2, 4, seed=1)(image, 7), views[2])
    assert not torch.equal(SeededView(transform, 2, 4, seed=0)(image, 8), views[2]), "each image its own draw"
    assert "view=2 of 4, seed=0" in repr(SeededView(transform, 2, 4, seed=0)), "the cache key names the view"


def test_every_view_is_served_once_per_v_epochs_in_a_seeded_order():
    views, n = 3, 5
    maps = torch.arange(views * n, dtype=torch.float16).reshape(views, n, 1, 1, 1)  # value = view * n + image
    data = AugmentedViewsDataset(maps, torch.zeros(n, dtype=torch.long), seed=0)
    served = torch.stack([data.__getitems__(torch.randperm(n).sort().values)[0].flatten() for _ in range(views)])
    assert sorted((served // n).long()[:, 2].tolist()) == [0, 1, 2], "image 2 saw each view once in 3 epochs"
    again = AugmentedViewsDataset(maps, torch.zeros(n, dtype=torch.long), seed=0)
    assert torch.equal(torch.stack([again.__getitems__(list(range(n)))[0].flatten() for _ in range(views)]), served)


@pytest.fixture
def count_image_reads(monkeypatch):
    reads = []
    original = images.ImageClassificationDataset.__getitem__

    def counted(self, index):
        reads.append(index)
        return original(self, index)

    monkeypatch.setattr(images.ImageClassificationDataset, "__getitem__", counted)
    return reads


def test_partial_on_cached_views_reads_no_image_once_they_are_built(tmp_path, count_image_reads):
    from fmtransfer.cli.config import compose_config
    from fmtransfer.regimes import run_regime

    data = write_image_folder(tmp_path / "digits", {"train": 4, "val": 2, "test": 2})
    overrides = [f"data.path={data}", f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}"]
    overrides += ["data.image_size=32", "trainer.progress_bar=false", "regime=partial", "regime.k=1"]
    overrides += ["regime.views=2", "regime.epochs=2", "regime.min_steps=2", "regime.batch_size=4"]
    first = run_regime(compose_config(overrides), tmp_path / "seed0")
    assert first["partial"]["training_maps"] == "2 cached views" and count_image_reads
    manifests = [p.read_text() for p in (tmp_path / "data" / "cache").glob("*/train-*/manifest.json")]
    assert sum("SeededView(view=" in m for m in manifests) == 2, "one cache entry per view of the training split"
    count_image_reads.clear()
    second = run_regime(compose_config([*overrides, "seed=1"]), tmp_path / "seed1")
    assert count_image_reads == [], "another seed trains on the same cached views"
    assert second["epochs"] >= 2
    # The regime's own augmentation over data.augment: other views, in entries of their own.
    lighter = run_regime(compose_config([*overrides, "regime.augment.scale=[0.5,1.0]"]), tmp_path / "lighter")
    assert count_image_reads and lighter["regime_config"]["augment"]["scale"] == [0.5, 1.0]
    manifests = [p.read_text() for p in (tmp_path / "data" / "cache").glob("*/train-*/manifest.json")]
    assert sum("SeededView(view=" in m for m in manifests) == 4 and sum("0.5, 1.0" in m for m in manifests) == 2
    # partial's own image size: its views (and maps and probe) extracted at that size, in entries of their own.
    sized = run_regime(compose_config([*overrides, "regime.image_size=48"]), tmp_path / "sized")
    assert sized["image_size"] == [3, 48, 48] and first["image_size"] == [3, 32, 32]
    manifests = [p.read_text() for p in (tmp_path / "data" / "cache").glob("*/train-*/manifest.json")]
    assert sum("SeededView(view=" in m for m in manifests) == 6
    # A refit that cross-validation sent to epoch 0 keeps its start: it builds no views for training it will not do.
    refit = [*overrides, "data.cv.refit=true", "data.cv.epochs=0", "regime.view_seed=5"]
    kept = run_regime(compose_config(refit), tmp_path / "kept")
    assert kept["epochs"] == 0 and kept["partial"]["training_maps"] == "cached"
    manifests = [p.read_text() for p in (tmp_path / "data" / "cache").glob("*/train-*/manifest.json")]
    assert not any("seed=5" in m for m in manifests)
    # A refit that trains on views validates nothing: it extracts none of its pool's un-augmented maps.
    level = f'"{first["partial"]["split_level"]}":'

    def unaugmented_entries() -> list[Path]:
        entries = [p.parent for p in (tmp_path / "data" / "cache").glob("*/*/manifest.json")]
        texts = {e: (e / "manifest.json").read_text() for e in entries if not e.name.startswith("test-")}
        return [e for e, text in texts.items() if level in text and "SeededView(view=" not in text]

    assert unaugmented_entries(), "the folds above validate on the un-augmented maps"
    for entry in unaugmented_entries():
        shutil.rmtree(entry)
    trained = run_regime(compose_config([*overrides, "data.cv.refit=true", "data.cv.epochs=1"]), tmp_path / "refit")
    assert trained["epochs"] == 1 and trained["partial"]["training_maps"] == "2 cached views"
    assert unaugmented_entries() == []
