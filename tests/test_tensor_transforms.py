"""Images decoded once and transformed on the training device: timm's own transforms are the reference (the same
random draws, the same evaluation floats), and a live run on decoded splits reads no image file while it trains."""

from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision import transforms

from fmtransfer.backbone import (
    build_eval_transform,
    build_train_transform,
    describe_backbone,
    merge_augment,
    resolve_data_config,
)
from fmtransfer.backbone.tensor_transforms import NotOnTensors, TensorAugment, TensorEval, to_uint8_tensor
from fmtransfer.errors import ConfigError


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """scikit-learn's two bundled photographs (427x640), and crops of them of other sizes and shapes."""
    a, b = (Image.fromarray(x) for x in load_sample_images().images)
    return [a, b, a.crop((0, 0, 300, 200)), b.crop((50, 20, 250, 420)), a.resize((97, 61))]


@pytest.fixture(scope="module")
def data_config() -> dict:
    return resolve_data_config(describe_backbone("tf_efficientnet_lite0", "random", None).pretrained_cfg, image_size=96)


def test_evaluation_images_prepared_once_are_the_floats_timm_s_transform_makes(photos, data_config):
    timm_eval = build_eval_transform(data_config)
    ours = TensorEval(timm_eval)
    prepared = torch.stack([ours.prepare(p) for p in photos])
    assert prepared.dtype == torch.uint8 and prepared.shape == (len(photos), 3, 96, 96)
    assert torch.equal(ours(prepared), torch.stack([timm_eval(p) for p in photos]))


@pytest.mark.parametrize(
    "augment", [{}, {"scale": (0.35, 1.0), "color_jitter": 0.0}, {"hflip": 0.0}, {"crop": "eval_framing"}]
)
def test_augmentation_on_tensors_draws_what_timm_s_draws_and_makes_the_same_images(photos, data_config, augment):
    timm_train = build_train_transform(data_config, augment)
    ours = TensorAugment(timm_train)
    tensors = [to_uint8_tensor(p) for p in photos] * 4
    crop = timm_train.transforms[0]
    random.seed(3)
    expected_boxes = [crop.get_params(p, crop.scale, crop.ratio) for p in photos * 4]
    random.seed(3)
    assert [ours.crop_box(t) for t in tensors] == expected_boxes  # same parameters, same generator
    random.seed(7), torch.manual_seed(7)
    reference = torch.stack([timm_train(p) for p in photos * 4])
    random.seed(7), torch.manual_seed(7)
    batch = ours(tensors)
    assert batch.shape == reference.shape == (20, 3, 96, 96)
    # Only the resampling differs (torchvision's antialiased resize on the tensor against PIL's): the same crops,
    # flips and jitter leave images within a few grey levels of timm's on average.
    difference = (batch - reference).abs()
    assert difference.mean() < 0.01 and torch.quantile(difference.flatten(), 0.99) < 0.05
    assert (batch - torch.stack([timm_train(p) for p in photos * 4])).abs().mean() > 0.05, "other draws, other images"


def test_crops_at_the_evaluation_s_framing_are_its_centre_crop_shifted_on_every_shape(photos, data_config):
    """crop=eval_framing: on each photo (4:3, portrait, tiny) a square of the evaluation's framing at many positions;
    the centred one, resized, is timm's evaluation image. timm's random resized crop at crop_pct squared is one fixed
    crop on a 4:3 photo (no such square fits its area)."""
    framed = build_train_transform(data_config, {"crop": "eval_framing", "hflip": 0.0, "color_jitter": 0.0})
    crop, timm_eval = framed.transforms[0], build_eval_transform(data_config)
    square = build_train_transform(data_config, {"scale": (0.765625, 0.765625), "ratio": (1.0, 1.0)}).transforms[0]
    to_float = transforms.Compose(framed.transforms[-2:])

    def centred(photo: Image.Image, side: int) -> torch.Tensor:
        width, height = photo.size
        left, top = (width - side) // 2, (height - side) // 2
        return to_float(photo.crop((left, top, left + side, top + side)).resize((96, 96), Image.BICUBIC))

    random.seed(0)
    for photo in photos:
        boxes = {crop.get_params(photo) for _ in range(50)}
        width, height = photo.size
        assert all(h == w and 0 <= t <= height - h and 0 <= left <= width - w for t, left, h, w in boxes)
        assert len(boxes) > 10, photo.size
        # Its side is the evaluation's framing: the centred square, resized, is timm's evaluation image up to
        # resampling, 1.5 times as close as squares 5 % smaller or larger, 2.5 times the whole short side.
        side, short = next(iter(boxes))[2], min(photo.size)
        distance = {s: (centred(photo, s) - timm_eval(photo)).abs().mean() for s in (side, int(side * 0.95), short)}
        larger = min(int(side * 1.05), short)
        distance[larger] = (centred(photo, larger) - timm_eval(photo)).abs().mean()
        assert 1.5 * distance[side] < min(distance[int(side * 0.95)], distance[larger]), (photo.size, distance)
        assert 2.5 * distance[side] < distance[short], (photo.size, distance)
    assert len({square.get_params(photos[0], square.scale, square.ratio) for _ in range(50)}) == 1


def test_crop_settings_are_checked_and_a_regime_s_eval_framing_drops_the_shared_ranges():
    shared = {"scale": [0.08, 1.0], "ratio": [0.75, 1.3333], "hflip": 0.5}
    merged = merge_augment(shared, {"crop": "eval_framing", "hflip": 0.0, "scale": None})
    assert merged == {"crop": "eval_framing", "hflip": 0.0}
    assert merge_augment(shared, {"scale": [0.35, 1.0]})["scale"] == (0.35, 1.0)
    with pytest.raises(
        ConfigError, match=r"regime\.augment\.scale is not used with regime\.augment\.crop=eval_framing"
    ):
        merge_augment(shared, {"crop": "eval_framing", "scale": [0.5, 1.0]})
    with pytest.raises(ConfigError, match=r"data\.augment\.crop='centre' is not one of"):
        merge_augment({"crop": "centre"}, {})


def test_an_augmentation_without_a_tensor_counterpart_is_said_not_run(data_config):
    with pytest.raises(NotOnTensors, match="RandomErasing"):
        TensorAugment(build_train_transform(data_config, {"re_prob": 0.5}))


def test_a_live_run_on_decoded_splits_reads_no_image_while_it_trains_and_the_next_run_reuses_them(
    tmp_path, tiny_overrides, monkeypatch
):
    from fmtransfer.cli.config import compose_config
    from fmtransfer.data import decoded as decoded_mod
    from fmtransfer.regimes import run_regime

    overrides = [
        *tiny_overrides,
        "data.shots_per_class=3",
        "regime=finetune",
        "regime.epochs=2",
        "regime.min_steps=2",
        "regime.image_size=32",
        "data.decode_once=true",
    ]
    monkeypatch.setattr(decoded_mod, "_DECODED", OrderedDict())  # nothing decoded by earlier tests' runs
    decodes = []
    real_to_rgb = decoded_mod.to_rgb
    monkeypatch.setattr(decoded_mod, "to_rgb", lambda image: decodes.append(1) or real_to_rgb(image))

    class NoPerEpochImages:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a per-epoch image dataset was built: images would be decoded every epoch")

    monkeypatch.setattr("fmtransfer.training.datamodules.ImageClassificationDataset", NoPerEpochImages)
    first = run_regime(compose_config(overrides), tmp_path / "first")
    assert first["epochs"] >= 2 and len(decodes) == sum(first["split_sizes"].values())  # each image once
    second = run_regime(compose_config([*overrides, "seed=1"]), tmp_path / "second")
    assert second["epochs"] >= 2 and len(decodes) == sum(first["split_sizes"].values()), "reused, not decoded"
    assert np.isfinite(second["val"]["acc"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the augmentation on GPU-resident images")
def test_augmentation_on_gpu_resident_images_matches_the_cpu_s(photos, data_config):
    ours = TensorAugment(build_train_transform(data_config, {}))
    tensors = [to_uint8_tensor(p) for p in photos]
    random.seed(5), torch.manual_seed(5)
    on_cpu = ours(tensors)
    random.seed(5), torch.manual_seed(5)
    on_gpu = ours([t.cuda() for t in tensors])
    assert on_gpu.is_cuda and (on_gpu.cpu() - on_cpu).abs().max() < 0.02


def photo_folder(root, photos_per_class: int = 10):
    """An ImageFolder of JPEGs: crops of scikit-learn's two photographs (one class each), train/validation/test."""
    rng = np.random.default_rng(0)
    for cls, photo in zip(("china", "flower"), load_sample_images().images, strict=True):
        for k in range(photos_per_class):
            split = "train" if k < photos_per_class - 4 else ("validation" if k % 2 else "test")
            top, left = rng.integers(0, 200), rng.integers(0, 300)
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo[top : top + 180, left : left + 240]).save(folder / f"{k}.jpg", quality=90)
    return root


def test_jpegs_decoded_on_the_extracting_device_give_the_maps_pil_gives_under_their_own_cache_key(tmp_path):
    """cache.decode=device (what auto picks on a GPU for JPEGs) runs here on the CPU: torchvision decodes each batch
    of encoded files where the model runs; the maps match PIL's up to resampling, in an entry of their own."""
    from fmtransfer.cache import CachedSplit
    from fmtransfer.cli.config import compose_config
    from fmtransfer.regimes import run_regime

    data = photo_folder(tmp_path / "photos")
    base = [
        f"data.path={data}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "data.image_size=64",
        "head.epochs=2",
        "head.min_steps=0",
        "trainer.progress_bar=false",
        "cache.levels=[pre_logits]",
    ]
    entries = {}
    for mode in ("pil", "device"):
        metrics = run_regime(compose_config([*base, f"cache.decode={mode}"]), tmp_path / mode)
        entries[mode] = CachedSplit.open(metrics["cache"]["entries"]["test"])
    assert entries["pil"].path != entries["device"].path
    assert "JpegEval" in entries["device"].manifest["parts"]["transform"]
    pil, device = (e.load("pre_logits").astype(np.float32) for e in (entries["pil"], entries["device"]))
    cosine = (pil * device).sum(1) / np.linalg.norm(pil, axis=1) / np.linalg.norm(device, axis=1)
    assert pil.shape == device.shape and cosine.min() > 0.98


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: nvJPEG decoding during extraction")
def test_on_a_gpu_auto_decodes_jpegs_on_it(tmp_path):
    from fmtransfer.cli.config import compose_config
    from fmtransfer.regimes import run_regime

    data = photo_folder(tmp_path / "photos")
    overrides = [f"data.path={data}", f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}"]
    metrics = run_regime(
        compose_config([*overrides, "trainer=gpu", "head.epochs=2", "cache.levels=[pre_logits]"]), tmp_path / "r"
    )
    from fmtransfer.cache import CachedSplit

    assert "JpegEval" in CachedSplit.open(metrics["cache"]["entries"]["test"]).manifest["parts"]["transform"]


def test_a_fold_s_decoded_images_are_its_base_splits_tensors_not_new_decodes(monkeypatch):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    from fmtransfer.data import decoded as decoded_mod

    from .conftest import digits_images

    monkeypatch.setattr(decoded_mod, "_DECODED", OrderedDict())
    pairs = digits_images(4, 3)
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=3)})
    bases = {
        name: Dataset.from_dict({"image": [p for p, _ in part], "label": [c for _, c in part]}, features=features)
        for name, part in (("train", pairs[:8]), ("validation", pairs[8:]))
    }
    names, rows = ["validation", "train", "train"], np.array([2, 0, 5])
    fold = Dataset.from_dict({"image": [pairs[10][0], pairs[0][0], pairs[5][0]], "label": [2, 0, 1]}, features=features)
    decoded = decoded_mod.decode(fold, to_uint8_tensor, 2**30, origin=(names, rows), bases=bases)
    train, validation = (decoded_mod.decode(bases[n], to_uint8_tensor, 2**30) for n in ("train", "validation"))
    assert decoded.images[0] is validation.images[2] and decoded.images[2] is train.images[5]
    assert decoded.labels.tolist() == [2, 0, 1] and torch.equal(
        decoded.images[1], to_uint8_tensor(pairs[0][0].convert("RGB"))
    )
