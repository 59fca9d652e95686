"""Feature-map cache: written once, reused without the backbone, invalidated by any input change, never half-read."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import timm
import torch

from fmtransfer.backbone import (
    FeatureMapExtractor,
    build_eval_transform,
    describe_backbone,
    parse_levels,
    resolve_data_config,
)
from fmtransfer.cache import CacheSpec, FeatureCache, RowSource, ensure_feature_cache, pool_map, store
from fmtransfer.data import prepare_data
from fmtransfer.errors import CacheError

BACKBONE = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def spec():
    return describe_backbone(BACKBONE)


@pytest.fixture(scope="module")
def model(spec):
    return spec.create()[0]


@pytest.fixture(scope="module")
def digits():
    return prepare_data("sklearn:digits", shots_per_class=3)


def build(
    cache,
    split,
    spec,
    model,
    *,
    size=32,
    levels=("level1", "level4", "pre_logits"),
    dtype="float16",
    pool="avg",
    pool_size=2,
    builder=None,
    split_name="train",
    precision="32-true",
    gather=None,
):
    data_config = resolve_data_config(spec.pretrained_cfg, size)
    chosen = parse_levels(list(levels), spec.levels)
    calls = []

    def default_builder():
        calls.append(1)
        return FeatureMapExtractor(model, chosen)

    result = ensure_feature_cache(
        cache,
        split_name,
        split,
        [str(i) for i in range(10)],
        BACKBONE,
        spec.weights.identity(),
        data_config,
        build_eval_transform(data_config),
        CacheSpec(tuple(chosen), dtype, pool, pool_size),
        builder or default_builder,
        trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False, "precision": precision},
        batch_size=8,
        gather=gather,
    )
    return result, calls


def test_extraction_writes_maps_manifest_and_matches_a_direct_forward(tmp_path, spec, model, digits):
    cache = FeatureCache(tmp_path)
    split = digits.splits["train"]
    result, calls = build(cache, split, spec, model, pool="none", dtype="float32")
    assert not result.hit and calls == [1]
    entry = result.split
    m = entry.manifest
    assert m["num_samples"] == 30 and m["complete"] is True
    assert m["levels"]["level1"]["shape"] == [24, 8, 8]  # stride 4 at 32 px
    assert m["levels"]["pre_logits"]["shape"] == [1280]
    assert m["levels"]["level4"]["bytes_per_image"] == 320 * 1 * 1 * 4
    assert m["class_names"][:2] == ["0", "1"]
    assert entry.labels().tolist() == split["label"]
    # Same numbers as running the backbone directly on the same preprocessed images.
    from fmtransfer.data import ImageClassificationDataset

    data_config = resolve_data_config(spec.pretrained_cfg, 32)
    ds = ImageClassificationDataset(split, build_eval_transform(data_config))
    import torch

    x = torch.stack([ds[i][0] for i in range(4)])
    with torch.no_grad():
        direct = FeatureMapExtractor(model, parse_levels(["level1", "pre_logits"], spec.levels))(x)
    np.testing.assert_allclose(entry.level("level1")[:4], direct["level1"].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(entry.level("pre_logits")[:4], direct["pre_logits"].numpy(), rtol=1e-4, atol=1e-4)


def test_load_reads_a_level_whole_and_refuses_damaged_files(tmp_path, spec, model, digits):
    result, _ = build(FeatureCache(tmp_path), digits.splits["train"], spec, model, pool="none", dtype="float16")
    entry = result.split
    for name in entry.level_names:
        loaded = entry.load(name)
        assert loaded.dtype == np.float16 and np.array_equal(loaded, np.asarray(entry.level(name)))
    out = np.zeros_like(entry.load("level1"))
    assert entry.load("level1", out) is out and np.array_equal(out, np.asarray(entry.level("level1")))
    with pytest.raises(CacheError, match="cannot read level 'level1'"):
        entry.load("level1", np.zeros((1, 2), np.float16))
    path = entry.path / entry.manifest["levels"]["level1"]["file"]
    path.write_bytes(path.read_bytes()[:-100])  # truncated after it was published
    with pytest.raises(CacheError, match="ended after"):
        entry.load("level1")


def test_second_request_reuses_the_cache_without_building_the_backbone(tmp_path, spec, model, digits):
    cache = FeatureCache(tmp_path)
    first, _ = build(cache, digits.splits["train"], spec, model)

    def must_not_build():
        raise AssertionError("the backbone was built on a cache hit")

    second, _ = build(cache, digits.splits["train"], spec, model, builder=must_not_build)
    assert second.hit and second.split.path == first.split.path
    # A request for a subset of the cached levels is served by the same entry.
    subset, _ = build(cache, digits.splits["train"], spec, model, levels=("pre_logits",), builder=must_not_build)
    assert subset.hit and subset.split.path == first.split.path


@pytest.mark.parametrize(
    "change",
    [
        {"size": 48},
        {"dtype": "float32"},
        {"pool": "global"},
        {"pool_size": 4},
        {"levels": ("level0", "pre_logits")},
        {"split_name": "validation"},
    ],
)
def test_any_change_that_alters_the_features_re_extracts(tmp_path, spec, model, digits, change):
    cache = FeatureCache(tmp_path)
    first, _ = build(cache, digits.splits["train"], spec, model)
    second, calls = build(cache, digits.splits["train"], spec, model, **change)
    assert not second.hit and calls == [1]
    assert second.split.path != first.split.path


def test_different_images_or_weights_re_extract(tmp_path, spec, model, digits):
    cache = FeatureCache(tmp_path)
    build(cache, digits.splits["train"], spec, model)
    other_shots = prepare_data("sklearn:digits", shots_per_class=3, shots_seed=1)
    result, calls = build(cache, other_shots.splits["train"], spec, model)
    assert not result.hit and calls == [1]
    random_spec = describe_backbone(BACKBONE, weights="random")
    random_model = timm.create_model(BACKBONE)
    result, calls = build(cache, digits.splits["train"], random_spec, random_model)
    assert not result.hit and calls == [1]


def test_interrupted_extraction_is_never_taken_as_complete(tmp_path, spec, model, digits):
    cache = FeatureCache(tmp_path)
    extractor = FeatureMapExtractor(model, parse_levels(["level1", "level4", "pre_logits"], spec.levels))
    calls = {"n": 0}
    original_forward = extractor.forward

    def dies_midway(x):
        calls["n"] += 1
        if calls["n"] > 2:  # the shape probe, then one real batch, then the "crash"
            raise RuntimeError("simulated crash mid-extraction")
        return original_forward(x)

    extractor.forward = dies_midway
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(cache, digits.splits["train"], spec, model, builder=lambda: extractor)
    folder = tmp_path / BACKBONE
    assert not [p for p in folder.iterdir() if p.is_dir()], "nothing may be published or left behind"
    result, calls2 = build(cache, digits.splits["train"], spec, model)
    assert not result.hit and calls2 == [1]


def test_partial_directory_from_a_killed_process_is_ignored_and_cleaned(tmp_path, spec, model, digits):
    cache = FeatureCache(tmp_path)
    first, _ = build(cache, digits.splits["train"], spec, model)
    # What a SIGKILL mid-extraction leaves: a partial directory, and (worse) an entry without its manifest.
    key = first.split.manifest["fingerprint"]
    leftover = first.split.path.parent / f".partial-train-{key}-12345-deadbeef"
    leftover.mkdir()
    (leftover / "level1.npy").write_bytes(b"\x93NUMPY half written")
    (first.split.path / "manifest.json").unlink()
    result, calls = build(cache, digits.splits["train"], spec, model)
    assert not result.hit and calls == [1]
    assert not leftover.exists()
    assert json.loads((result.split.path / "manifest.json").read_text())["complete"] is True


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_cache_file_is_detected_and_rebuilt(tmp_path, spec, model, digits, damage):
    cache = FeatureCache(tmp_path)
    first, _ = build(cache, digits.splits["train"], spec, model)
    target = first.split.path / "level4.npy"
    raw = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(raw[: len(raw) // 2])
    else:
        raw[-3] ^= 0xFF
        target.write_bytes(bytes(raw))
    result, calls = build(cache, digits.splits["train"], spec, model)
    assert not result.hit and calls == [1]
    assert result.split.level("level4").shape[0] == 30


def test_checksums_are_computed_once_per_entry_and_again_when_a_file_changes(
    tmp_path, spec, model, digits, monkeypatch
):
    """cache.verify=checksum: the first hit hashes every file and records sizes and mtimes (verified.json); later
    hits hash nothing; a file rewritten in place (same size, new mtime) is hashed again and its damage found."""
    import os

    from fmtransfer.cache import store

    cache = FeatureCache(tmp_path)
    first, _ = build(cache, digits.splits["train"], spec, model)
    hashed = []
    real = store.file_checksum
    monkeypatch.setattr(store, "file_checksum", lambda p: hashed.append(p.name) or real(p))
    files = sorted(p.name for p in first.split.path.glob("*.npy"))
    assert build(cache, digits.splits["train"], spec, model)[0].hit and sorted(hashed) == files
    assert set(json.loads((first.split.path / "verified.json").read_text())) == set(files)
    hashed.clear()
    assert build(cache, digits.splits["train"], spec, model)[0].hit and hashed == [], "verified once: no re-hash"
    target = first.split.path / "level4.npy"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))  # touched, bytes intact
    assert build(cache, digits.splits["train"], spec, model)[0].hit and hashed == ["level4.npy"]
    hashed.clear()
    raw = bytearray(target.read_bytes())
    raw[-3] ^= 0xFF
    target.write_bytes(bytes(raw))  # same size, new mtime: hashed again, damage found, rebuilt
    result, calls = build(cache, digits.splits["train"], spec, model)
    assert not result.hit and calls == [1] and "level4.npy" in hashed


def test_two_concurrent_builders_extract_once(tmp_path, spec, model, digits):
    cache = FeatureCache(tmp_path)
    calls, results = [], []
    extractor = FeatureMapExtractor(model, parse_levels(["level1", "level4", "pre_logits"], spec.levels))

    def slow_builder():
        calls.append(1)
        time.sleep(0.5)  # widen the race window
        return extractor

    def worker():
        results.append(build(cache, digits.splits["train"], spec, model, builder=slow_builder)[0])

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r.hit for r in results) == [False, True]


def test_unwritable_cache_directory_is_a_clear_error(tmp_path, spec, model, digits):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    with pytest.raises(CacheError, match=r"cache\.dir"):
        build(FeatureCache(blocker / "cache"), digits.splits["train"], spec, model)


def test_pooling_modes_bound_the_map_size():
    import torch

    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    assert pool_map(x, "none", 4).shape == (2, 3, 16, 16)
    assert pool_map(x, "avg", 4).shape == (2, 3, 4, 4)
    assert pool_map(x, "avg", 32).shape == (2, 3, 16, 16)
    g = pool_map(x, "global", 4)
    assert g.shape == (2, 3) and torch.allclose(g, x.mean((2, 3)))
    assert torch.allclose(pool_map(x, "avg", 4).mean((2, 3)), g), "avg pooling keeps the global mean"


def test_a_bf16_extraction_is_its_own_entry_and_close_to_fp32(tmp_path, spec, model, digits):
    """bf16 maps differ from fp32 ones: an entry made in one precision is never reused by the other."""
    cache = FeatureCache(tmp_path)
    split = digits.splits["train"]
    fp32, _ = build(cache, split, spec, model, dtype="float32")
    bf16, calls = build(cache, split, spec, model, dtype="float32", precision="bf16-mixed")
    assert not bf16.hit and calls == [1], "the fp32 entry must not serve a bf16 run"
    assert bf16.split.path != fp32.split.path
    assert bf16.split.manifest["parts"]["precision"] == "bf16-mixed" and bf16.split.manifest["parts"]["timm"]
    again, calls = build(cache, split, spec, model, dtype="float32", precision="bf16-mixed")
    assert again.hit and calls == [] and again.split.path == bf16.split.path
    a, b = fp32.split.load("pre_logits"), bf16.split.load("pre_logits")
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.99, "bf16 autocast keeps the features' direction"


def build_view(cache, base, rows, spec, model, digits, split_name="fold-validation"):
    """An index view of ``rows`` of the entry ``base`` (a plain entry or a view), as a cross-validation fold is."""
    split = digits.splits["train"].select(rows.tolist())
    sources = [RowSource(base, np.asarray(rows), np.arange(len(rows)))]
    return build(cache, split, spec, model, pool="none", split_name=split_name, gather=lambda: sources)


def test_fold_entries_are_index_views_that_copy_no_maps_and_read_in_bounded_chunks(
    tmp_path, spec, model, digits, monkeypatch
):
    """A fold's entry holds row indices only; reading it (whole, by chunks of cache.read_chunk_mb, pooled) gives its
    base's rows; a view of a view reads the maps' entry; a view whose base is gone is discarded."""
    from fmtransfer.heads import data as head_data
    from fmtransfer.heads.data import PooledFeatureDataset, PooledFeatureStream, pooled_grids, pooled_level

    cache = FeatureCache(tmp_path, read_chunk_mb=0.004)  # 4 KiB: one level1 row (24 x 8 x 8 float16) per chunk
    base = build(cache, digits.splits["train"], spec, model, pool="none")[0].split
    rows = np.random.default_rng(0).permutation(30)[:17]
    result, calls = build_view(cache, base, rows, spec, model, digits)
    view = result.split
    assert view.is_view and calls == [] and view.manifest["view"]["sources"] == [base.path.name]
    assert sorted(p.name for p in view.path.iterdir()) == ["labels.npy", "manifest.json", "rows.npy", "used"]
    assert view.labels().tolist() == base.labels()[rows].tolist()
    pieces = list(view.chunks("level1"))
    assert len(pieces) == 17 and all(len(chunk) == 1 for _, chunk in pieces)
    for name in base.level_names:
        expected = base.load(name)[rows]
        assert view.shape(name) == expected.shape and view.dtype(name) == expected.dtype
        assert np.array_equal(view.load(name), expected) and np.array_equal(view.read_rows(name, 3, 9), expected[3:9])
        assert np.array_equal(np.concatenate([c for _, c in view.chunks(name)]), expected)
    pooled = base.load("level1")[rows].astype(np.float32).mean((2, 3))
    np.testing.assert_array_equal(pooled_level(view, "level1"), pooled)
    np.testing.assert_array_equal(pooled_level(view, "level1", np.array([2, 5, 16])), pooled[[2, 5, 16]])
    monkeypatch.setattr(head_data, "POOL_BLOCK_BYTES", 1)  # converted to float32 one row at a time: the same means
    np.testing.assert_array_equal(pooled_level(view, "level1"), pooled)
    monkeypatch.undo()
    grids = pooled_grids(view, "level1", (1, 2))
    assert {k: tuple(v.shape) for k, v in grids.items()} == {"level1": (17, 24), "level1@2x2": (17, 96)}
    # The test split's stream: the whole pooled set's batches, pooled a chunk of rows at a time.
    whole = PooledFeatureDataset.from_cache(view, base.level_names)
    for chunk_mb, chunk_rows in ((0.004, 5), (0.07, 10)):  # a row of the three levels: 6.3 KiB
        stream = PooledFeatureStream(store.CachedSplit.open(view.path, chunk_mb), base.level_names, batch_size=5)
        batches = list(stream)
        assert stream.chunk_rows == chunk_rows and len(batches) == len(stream) == 4  # 5, 5, 5, 2 rows
        for b, (features, labels) in enumerate(batches):
            assert torch.equal(labels, whole.labels[5 * b : 5 * b + 5])
            assert all(torch.equal(features[k], whole.features[k][5 * b : 5 * b + 5]) for k in base.level_names)
    # A view of the view points at the maps' entry, not at the view.
    inner = np.array([16, 0, 5])
    nested, _ = build_view(cache, view, inner, spec, model, digits, split_name="fold-train")
    assert nested.split.manifest["view"]["sources"] == [base.path.name]
    assert np.array_equal(nested.split.load("level4"), base.load("level4")[rows[inner]])
    # Found again without gathering; discarded once its base is gone.
    again, _ = build_view(cache, base, rows, spec, model, digits)
    assert again.hit and again.split.path == view.path
    store.shutil.rmtree(base.path)
    parts = view.manifest["parts"]
    assert cache.find(BACKBONE, "fold-validation", parts, ["level1"]) is None and not view.path.exists()


def test_eviction_removes_least_recently_used_entries_predictions_first_never_locked_or_kept(
    tmp_path, spec, model, digits, monkeypatch, caplog
):
    import os

    with pytest.raises(CacheError, match=r"cache.max_gb=0 must be a positive size"):
        FeatureCache(tmp_path, max_gb=0)
    cache = FeatureCache(tmp_path)
    train = digits.splits["train"]
    old = build(cache, train, spec, model, pool="none")[0].split
    view = build_view(cache, old, np.arange(10), spec, model, digits)[0].split
    newer = build(cache, train.select(range(20)), spec, model, pool="none", split_name="validation")[0].split
    predicted = build(cache, train.select(range(25)), spec, model, pool="none", split_name="predict")[0].split
    for age, entry in enumerate([predicted, newer, view, old]):  # predict-* the most recently used
        os.utime(entry.path / store.USED, (time.time() - 100 * age,) * 2)
    monkeypatch.setattr(store, "_IN_USE", set())  # a later process: nothing of these is in use
    size = {e.path: store.folder_size(e.path) for e in (old, view, newer, predicted)}
    assert size[view.path] < 0.05 * size[old.path], "a view is its row index, not a copy"

    limited = FeatureCache(tmp_path, max_gb=(size[newer.path] + size[view.path] / 2) / 2**30)
    assert limited.evict() == [predicted.path, old.path, view.path], "predictions first, then the oldest + its view"
    assert [p.name for p in limited.entries()] == [newer.path.name]
    tiny = FeatureCache(tmp_path, max_gb=1e-9)
    key = newer.path.name.removeprefix("validation-")
    with tiny.lock(BACKBONE, "validation", key), caplog.at_level("WARNING"):
        assert tiny.evict() == [], "an entry being built (locked) is never removed"
    assert "over cache.max_gb" in caplog.text
    assert tiny.evict(keep={newer.path}) == [] and tiny.evict() == [newer.path]


@pytest.mark.parametrize("damage, message", [(1e6, "overflow float16.*cache.dtype=float32"), (float("nan"), "NaN")])
def test_non_finite_or_overflowing_maps_are_an_error_naming_the_level(tmp_path, spec, model, digits, damage, message):
    import copy

    import torch

    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.blocks[1][-1].bn3.weight.mul_(damage)  # level1 is blocks.1, whose last layer has no activation
    cache = FeatureCache(tmp_path)
    chosen = parse_levels(["level1", "pre_logits"], spec.levels)
    with pytest.raises(CacheError, match=f"level 'level1'.*{message}"):
        build(
            cache,
            digits.splits["train"],
            spec,
            model,
            levels=("level1", "pre_logits"),
            builder=lambda: FeatureMapExtractor(broken, chosen),
        )
    assert cache.entries() == [] and not list(tmp_path.glob("*/.partial-*")), "nothing was cached"
