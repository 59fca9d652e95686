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


def test_evaluation_pads_a_batch_to_a_power_of_two_rows_and_keeps_each_rows_logits():
    """With a backbone in the module, an evaluation batch of 5 runs through it as 8 rows (the compiled kernels of a
    few shapes serve every fold), and each image's logits are those it gets alone; training batches are not padded."""
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0")
    backbone = FeatureMapExtractor(model, parse_levels([PRE_LOGITS], describe_levels(model)))
    module = HeadClassifier(LinearProbeHead({PRE_LOGITS: model.num_features}, 3), 3, features=backbone).eval()
    rows_seen = []
    backbone.register_forward_pre_hook(lambda _, args: rows_seen.append(len(args[0])))
    x, y = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        logits, labels, loss = module._loss((x, y))
        alone = torch.cat([module(x[i : i + 1]) for i in range(len(x))])
    assert rows_seen[0] == 8 and logits.shape == (5, 3) and torch.equal(labels, y)
    torch.testing.assert_close(logits, alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(alone, y), atol=1e-4, rtol=1e-4)
    module.train()
    module._loss((x, y))
    assert rows_seen[-1] == 5
