"""make bench: every figure is measured (a real backbone, real images, a real Trainer) and written to bench.json."""

from __future__ import annotations

import json

import pytest
import torch

from fmtransfer.cli.bench import main as bench_main

from .conftest import SHARED

SHARED_HYMENOPTERA = SHARED / "hymenoptera"

FIGURES = (
    "extract_over_forward",
    "extract_over_forward_predecoded",
    "cached_head_speedup_e3",
    "partial_cached_over_live",
    "read_over_memcpy",
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = [
        f"paths.data_dir={out / 'data'}",
        f"paths.log_dir={out / 'logs'}",
        f"bench.out_dir={out / 'bench'}",
        "data.image_size=32",
        "data.shots_per_class=5",
        "bench.epochs=3",
        "bench.partial_epochs=1",
        "bench.rounds=1",
        "bench.repeats=1",
        "bench.fast_path.image_size=64",  # the fast-path rows at a test's size (make bench: the backbone's 224 px)
        "bench.fast_path.train_steps=1",
        "bench.fast_path.train_batch_size=8",
        "bench.partial_views.ks=[]",  # 2 x 3 partial runs at 224 px: make bench's figure, too slow for a test
        "bench.jpeg_extraction.image_size=32",
        "bench.jpeg_extraction.images=32",
    ]
    return out, args


def test_bench_writes_every_figure_and_prints_its_path_last(bench, capsys):
    out, args = bench
    bench_main(args)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"bench: {(out / 'bench' / 'bench.json').resolve()}"
    result = json.loads((out / "bench" / "bench.json").read_text())
    for key in FIGURES:
        assert result[key] > 0 and key in result["targets"], key
        assert any(line.startswith(key) for line in printed), f"{key} missing from the printed table"
    t = result["timings"]
    # Both sides of the head comparison trained the same head on the same data to (nearly) the same model.
    assert abs(t["head"]["cached_test_acc"] - t["head"]["live_test_acc"]) <= 0.05
    assert result["cached_head_speedup_e3"] == pytest.approx(
        t["head"]["live_total_seconds"] / t["head"]["cached_total_seconds"], rel=0.01
    )
    # The untargeted figures: both layouts and both ways of batching the cached features were measured.
    assert set(t["extract_images_per_s_by_layout"]) == {"nchw", "nhwc"}
    assert result["extract_nhwc_over_nchw"] == pytest.approx(
        t["extract_images_per_s_by_layout"]["nhwc"] / t["extract_images_per_s_by_layout"]["nchw"], rel=0.01
    )
    assert t["channels_last"] is True  # trainer.channels_last=auto: NHWC on CPUs and CUDA GPUs
    fast = result["cpu_fast_path"]
    if SHARED_HYMENOPTERA.is_dir():
        assert set(fast["modes"]) >= {"nchw_fp32", "nhwc_fp32"} and fast["images"] > 100
        for mode in fast["modes"].values():
            assert min(mode.values()) > 0
        if not fast["native_bf16"]:
            assert "no native bf16" in fast["skipped"]["nhwc_bf16"]
        assert any(line.startswith("  nhwc_fp32: forward") for line in printed)
    else:
        assert "not a folder" in fast["skipped"]
    jpeg = result["jpeg_extraction"]
    if SHARED_HYMENOPTERA.is_dir():  # the same JPEGs through PIL and through torchvision's decoder
        assert jpeg["images"] >= 32 and jpeg["pil_images_per_s"] > 0 and jpeg["device_images_per_s"] > 0
        assert any(line.startswith("extraction from JPEG files (") for line in printed)
    else:
        assert "not a folder" in jpeg["skipped"]
    assert result["partial_views"] == {"skipped": "bench.partial_views.ks or .seeds is empty"}
    assert "partial on cached views: not measured (bench.partial_views.ks or .seeds is empty)" in printed
    assert result["extract_predecoded_images_per_s"] == t["predecoded"]["extract_images_per_s"] > 0
    assert result["resident_over_dataloader"] == pytest.approx(
        t["head"]["dataloader_seconds_per_epoch"] / t["head"]["resident_seconds_per_epoch"], rel=0.01
    )
    # A cached prefix can only save the prefix's forward: its FLOP ratio lies between 1 and the full/suffix ratio.
    assert 1.0 < t["partial"]["flop_ratio"] < 10
    assert result["device"] == ("CPU" if not torch.cuda.is_available() else result["device"])
    assert not (out / "bench" / "cache").exists(), "the bench's cold caches should be removed"


def test_bytes_per_image_match_what_the_cache_writes(bench):
    out, _ = bench
    result = json.loads((out / "bench" / "bench.json").read_text())
    sizes = result["bytes_per_image"]
    # float16 halves float32; pooling only ever shrinks; the frozen run's manifest recorded the same avg8 sizes.
    for level, fp32 in sizes["float32"].items():
        assert sizes["float16"][level] * 2 == fp32
        assert sizes["float16_global"][level] <= sizes["float16_avg8"][level] <= sizes["float16"][level]
    metrics = json.loads((out / "bench" / "head-cached" / "metrics.json").read_text())
    for level, nbytes in metrics["cache"]["bytes_per_image"].items():
        assert sizes["float16_avg8"][level] == nbytes
