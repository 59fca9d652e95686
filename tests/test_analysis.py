"""Analysis: statistics right on a constructed backbone with a known dead channel; CKA, saliency, depth; notebook."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fmtransfer.analysis.similarity import cka_between, cka_matrix, linear_cka
from fmtransfer.analysis.statistics import level_statistics, receptive_fields
from fmtransfer.backbone import (
    FeatureMapExtractor,
    build_eval_transform,
    describe_backbone,
    parse_levels,
    resolve_data_config,
)
from fmtransfer.cache import CacheSpec, FeatureCache, ensure_feature_cache
from fmtransfer.data import prepare_data

from .conftest import shared_dataset

DEAD, ALWAYS_ON = 5, 9


def test_dead_channel_and_sparsity_found_on_a_constructed_backbone(tmp_path):
    """resnet18's level0 is relu(bn1(conv1 x)): channel 5 forced to zero, channel 9 to a positive constant."""
    spec = describe_backbone("resnet18", weights="random")
    model = spec.create()[0]
    with torch.no_grad():
        model.bn1.weight[DEAD], model.bn1.bias[DEAD] = 0.0, -1.0  # relu(-1) = 0 for every input
        model.bn1.weight[ALWAYS_ON], model.bn1.bias[ALWAYS_ON] = 0.0, 2.0  # relu(2) = 2 everywhere
    levels = parse_levels(["level0"], spec.levels)
    data = prepare_data("sklearn:digits", shots_per_class=3)
    data_config = resolve_data_config(spec.pretrained_cfg, 32)
    result = ensure_feature_cache(
        FeatureCache(tmp_path),
        "train",
        data.splits["train"],
        data.class_names,
        "resnet18-constructed",
        "x",
        data_config,
        build_eval_transform(data_config),
        CacheSpec(tuple(levels), "float32", "none"),
        lambda: FeatureMapExtractor(model, levels),
        trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False},
    )
    stats = level_statistics(result.split.level("level0"), result.split.labels(), "level0")
    assert np.flatnonzero(stats.dead).tolist() == [DEAD]
    assert stats.sparsity[DEAD] == 1.0 and stats.zero_fraction[DEAD] == 1.0
    assert stats.sparsity[ALWAYS_ON] == 0.0 and not stats.dead[ALWAYS_ON]
    assert stats.mean[ALWAYS_ON] == pytest.approx(2.0) and stats.std[ALWAYS_ON] == pytest.approx(0.0, abs=1e-6)
    live = np.delete(np.arange(64), [DEAD, ALWAYS_ON])
    assert 0.0 < stats.sparsity[live].mean() < 1.0, "ReLU outputs of random filters are partly zero"


def test_class_selectivity_of_constructed_maps():
    labels = np.repeat(np.arange(4), 25)
    maps = np.zeros((100, 3, 2, 2), dtype=np.float32)
    maps[labels == 2, 0] = 1.0  # channel 0 fires for class 2 only
    maps[:, 1] = 1.0  # channel 1 fires for everything
    stats = level_statistics(maps, labels)
    assert stats.selectivity[0] == pytest.approx(1.0)
    assert stats.selectivity[1] == pytest.approx(0.0)
    assert stats.dead.tolist() == [False, False, True]


def test_linear_cka_properties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 10))
    q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    assert linear_cka(x, 3 * x @ q) == pytest.approx(1.0)  # invariant to rotation and scale
    assert linear_cka(x, rng.standard_normal((200, 10))) < 0.2
    names, m = cka_matrix({"a": x, "b": x @ q, "c": rng.standard_normal((200, 4))})
    assert names == ["a", "b", "c"] and m[0, 1] == pytest.approx(1.0) and np.allclose(m, m.T)
    assert cka_between({"a": torch.tensor(x)}, {"a": torch.tensor(x)}) == {"a": pytest.approx(1.0)}


def test_receptive_field_grows_with_depth():
    import timm

    rf = receptive_fields(timm.create_model("resnet18"), {"level0": 0, "level1": 1, "level4": 4}, input_size=256)
    assert rf["level0"] == 7  # one 7x7 stride-2 convolution
    assert rf["level0"] < rf["level1"] < rf["level4"]


def test_occlusion_sensitivity_finds_the_only_informative_patch():
    from fmtransfer.analysis.saliency import grad_cam, occlusion_sensitivity

    def predict(x):  # class 1's logit is the mean of the top-left 8x8 corner
        s = x[:, :, :8, :8].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(s), 10 * s], 1)

    image = torch.zeros(1, 3, 32, 32)
    image[:, :, :8, :8] = 1.0
    occ = occlusion_sensitivity(predict, image, target=1, patch=8, stride=8)
    assert occ.shape == (4, 4) and occ.argmax().item() == 0 and occ[1:, 1:].abs().max() < 1e-6
    cam = grad_cam(lambda x: x, lambda f: predict(f), image, target=1)
    assert cam.shape == (32, 32) and cam[:8, :8].min() > 0 and cam[16:, 16:].max() == 0


def test_early_levels_transfer_worse_than_later_ones_on_hymenoptera(tmp_path):
    from fmtransfer.analysis import transfer_by_depth

    root = shared_dataset("hymenoptera")
    data = prepare_data(str(root), rename={"validation": "test"}, val_fraction=0.2)
    spec = describe_backbone("tf_efficientnet_lite0")
    levels = parse_levels("all", spec.levels)
    data_config = resolve_data_config(spec.pretrained_cfg)
    built = {}
    caches = {
        s: ensure_feature_cache(
            FeatureCache(tmp_path),
            s,
            data.splits[s],
            data.class_names,
            spec.name,
            spec.weights.identity(),
            data_config,
            build_eval_transform(data_config),
            CacheSpec(tuple(levels), "float16", "global"),
            lambda: built.setdefault("x", FeatureMapExtractor(spec.create()[0], levels)),
            trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False},
        ).split
        for s in ("train", "validation")
    }
    acc = transfer_by_depth(caches["train"], caches["validation"])
    assert acc["level0"] < acc["level3"] and acc["level1"] < acc["pre_logits"]
    assert max(acc["level0"], acc["level1"]) < min(acc["level4"], acc["pre_logits"])


def test_notebook_runs_headless_and_make_analyze_writes_figures(tmp_path):
    from fmtransfer.analysis.run import run_analysis
    from fmtransfer.cli.config import compose_config
    from fmtransfer.cli.notebook import execute_notebook

    overrides = [
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "data.image_size=48",
        "data.shots_per_class=10",
        "analysis.tsne=false",
        "analysis.rf_input_size=128",
        # every section runs; activation maximisation at a few steps (its own behaviour: tests/test_visualise.py)
        "analysis.max_levels=[level2,level4]",
        "analysis.max_channels=2",
        "analysis.max_size=32",
        "analysis.max_steps=4",
    ]
    result = run_analysis(compose_config(overrides, name="analyze"), tmp_path / "analysis")
    written = {p.name for p in (tmp_path / "analysis").iterdir()}
    assert {"analysis.md", "analysis.json", "statistics.png", "depth.png", "cka.png"} <= written
    assert any(n.startswith("grid_") for n in written) and any(n.startswith("saliency_") for n in written)
    assert (
        json.loads((tmp_path / "analysis" / "analysis.json").read_text())["transfer_by_depth"]
        == result["transfer_by_depth"]
    )
    ipynb, html = execute_notebook(overrides, tmp_path / "nb")
    executed = json.loads(ipynb.read_text())
    errors = [
        o
        for c in executed["cells"]
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert errors == []
    images = sum(1 for c in executed["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    assert images >= 6
    assert "<img" in html.read_text() or "image/png" in html.read_text()
