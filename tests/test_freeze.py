"""Frozen means frozen: no gradients and no BatchNorm statistic changes during a real Lightning fit."""

from __future__ import annotations

import copy

import numpy as np
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from fmtransfer.backbone import PRE_LOGITS, FeatureMapExtractor, FrozenModule, describe_levels, parse_levels
from fmtransfer.heads import HeadClassifier, LinearProbeHead

from .conftest import bare_trainer, digits_images


def test_frozen_backbone_is_unchanged_by_training():
    model = timm.create_model("tf_efficientnet_lite0")  # architecture only: freezing does not depend on weights
    levels = parse_levels([PRE_LOGITS], describe_levels(model))
    backbone = FrozenModule(FeatureMapExtractor(model, levels))
    before = copy.deepcopy(backbone.state_dict())

    images = digits_images(n_per_class=8, classes=2)
    x = (
        torch.stack(
            [torch.from_numpy(np.array(im.convert("RGB").resize((64, 64)))).permute(2, 0, 1) for im, _ in images]
        ).float()
        / 127.5
        - 1
    )
    y = torch.tensor([c for _, c in images])
    head = LinearProbeHead({PRE_LOGITS: model.num_features}, 2)
    module = HeadClassifier(head, 2, lr=0.05, max_epochs=2, features=backbone)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    head_before = head.classifier.weight.detach().clone()

    bare_trainer(max_epochs=2).fit(module, loader)

    after = backbone.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"frozen backbone tensors changed: {changed[:5]}"
    assert all(not p.requires_grad for p in backbone.parameters())
    bn = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bn and all(not m.training for m in bn), "BatchNorm must stay in eval mode"
    assert not torch.equal(head_before, head.classifier.weight), "the head itself must have trained"


def test_train_mode_switch_leaves_wrapped_module_in_eval():
    frozen = FrozenModule(torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5)))
    frozen.train()
    assert frozen.training and not frozen.module.training
    assert all(not m.training for m in frozen.module.modules())
