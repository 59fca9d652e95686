"""BitFit, LoRA and surgical fine-tuning: which parameters train, counted against peft's own numbers, and Auto-RGN's
learning-rate multipliers against the relative gradient norms computed by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fmtransfer.backbone import FeatureMapExtractor, FixedBatchNormStats, describe_backbone
from fmtransfer.backbone.tuning import add_lora, lora_config, merge_lora, parameter_blocks, relative_grad_norms
from fmtransfer.errors import ConfigError
from fmtransfer.heads import HeadClassifier, LinearProbeHead
from fmtransfer.regimes.efficient import BitFitRegime, LoraRegime, SurgicalRegime
from fmtransfer.training import RelativeGradNormLR

from .conftest import bare_trainer

SETTINGS = dict(
    lp_ft=True,
    fixed_bn_stats=True,
    epochs=1,
    min_steps=1,
    lr=0.01,
    backbone_lr=0.01,
    weight_decay=0.0,
    optimizer="adamw",
    batch_size=4,
    monitor="val/loss",
    monitor_mode="min",
    warmup_epochs=0.0,
    layer_decay=None,
    drop_path_rate=0.0,
    label_smoothing=0.0,
    augment={},
    image_size=32,
)


@pytest.fixture(scope="module")
def spec():
    return describe_backbone("tf_efficientnet_lite0", weights="random")


def _trained_names(regime, spec) -> tuple[set[str], set[str]]:
    """(names marked trainable by ``regime.tune``, names whose values changed in one epoch of real training with
    fixed BatchNorm statistics); BatchNorm buffers must not change."""
    model = regime.tune(spec.create()[0])
    before = copy.deepcopy(model.state_dict())
    features = FixedBatchNormStats(FeatureMapExtractor(model, [spec.levels[-1]]))
    head = LinearProbeHead({"pre_logits": 1280}, 3)
    module = HeadClassifier(head, 3, lr=0.01, backbone_lr=0.01, features=features, per_tensor_lr=regime.auto_rgn())
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    callbacks = [RelativeGradNormLR()] if regime.auto_rgn() else []
    features.train()
    bare_trainer(callbacks=callbacks).fit(module, loader)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    marked = {n for n, p in model.named_parameters() if p.requires_grad}
    return marked, changed


def test_bitfit_trains_only_biases_and_norms(spec):
    marked, changed = _trained_names(BitFitRegime(**SETTINGS), spec)
    model = spec.create()[0]
    norms = {
        f"{m_name}.{p_name}"
        for m_name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for p_name, _ in m.named_parameters(recurse=False)
    }
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert marked == norms | biases and len(norms) == 2 * sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    classifier = {"classifier.weight", "classifier.bias"}  # timm's own classifier: the pre-logits head never uses it
    assert changed == marked - classifier, "exactly the biases and norms trained; no running statistic moved"


@pytest.mark.parametrize(("block", "label"), [("first", "stem"), ("last", "blocks.6+conv_head+bn2"), (3, "blocks.2")])
def test_surgical_trains_exactly_the_chosen_block(spec, block, label):
    regime = SurgicalRegime(**SETTINGS, block=block)
    marked, changed = _trained_names(regime, spec)
    blocks = parameter_blocks(spec.create()[0])
    assert marked == changed == set(blocks[label])
    assert regime.tuned(regime.tune(spec.create()[0]), {})["what"] == f"block {label}"


def test_parameter_blocks_partition_the_backbone_in_forward_order(spec):
    model = spec.create()[0]
    blocks = parameter_blocks(model)
    names = [n for ns in blocks.values() for n in ns]
    assert len(names) == len(set(names))
    assert set(names) == {n for n, _ in model.named_parameters()} - {"classifier.weight", "classifier.bias"}
    assert list(blocks) == ["stem", *[f"blocks.{i}" for i in range(6)], "blocks.6+conv_head+bn2"]
    with pytest.raises(ConfigError, match=r"regime\.block=9 .*0-7"):
        SurgicalRegime(**SETTINGS, block=9).tune(model)


def test_lora_trainable_count_is_peft_s_own(spec):
    """Our adapted backbone trains exactly what peft's get_peft_model counts for the same config, which is
    rank x (in + out) per adapted 1x1 convolution; no depthwise convolution is adapted."""
    from peft import get_peft_model

    regime = LoraRegime(**SETTINGS, rank=4, alpha=8.0, dropout=0.0, targets="pointwise")
    model = regime.tune(spec.create()[0])
    ours = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = spec.create()[0]
    config = lora_config(base, 4, 8.0, 0.0, "pointwise")
    peft_trainable, _ = get_peft_model(copy.deepcopy(base), config).get_nb_trainable_parameters()
    pointwise = [m for m in base.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]
    assert ours == peft_trainable == sum(4 * (m.in_channels + m.out_channels) for m in pointwise)
    assert not any("conv_dw" in n and "lora" in n for n, _ in model.named_parameters())
    marked, changed = _trained_names(regime, spec)
    assert marked == changed == {n for n, _ in model.named_parameters() if ".lora_" in n}, "the adapters train, only"


def test_lora_targets_by_regular_expression_and_bad_targets_are_named(spec):
    model = add_lora(spec.create()[0], 2, 2.0, 0.0, r"blocks\.6\..*")
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert adapted == {"blocks.6.0.conv_pw", "blocks.6.0.conv_pwl"}
    with pytest.raises(ConfigError, match=r"regime\.targets='nothing_here' matches no linear layer"):
        add_lora(spec.create()[0], 2, 2.0, 0.0, "nothing_here")


def test_merging_lora_gives_the_unmerged_function_with_plain_layers(spec):
    model = add_lora(spec.create()[0].eval(), 4, 8.0, 0.0, "pointwise")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        x = torch.randn(4, 3, 32, 32)
        unmerged = model(x)
        merged_model = merge_lora(model)
        merged = merged_model(x)
    assert not any(".lora_" in n or "base_layer" in n for n, _ in merged_model.named_parameters())
    base = spec.create()[0].eval()
    assert (unmerged - base(x)).abs().max() > 1e-2, "the adapters change the function"
    assert (merged - unmerged).abs().max() < 1e-4


def test_auto_rgn_multipliers_are_the_relative_gradient_norms_on_a_fixed_batch(spec):
    """relative_grad_norms against ||g|| / ||w|| / max computed by hand; the callback then sets each tensor's group
    to its scheduled rate times that multiplier."""
    regime = SurgicalRegime(**SETTINGS, block="auto")
    model = regime.tune(spec.create()[0])
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".bn" in n or n.startswith("bn"))
    features = FeatureMapExtractor(model, [spec.levels[-1]])
    module = HeadClassifier(
        LinearProbeHead({"pre_logits": 1280}, 3), 3, lr=0.01, backbone_lr=0.002, features=features, per_tensor_lr=True
    )
    optimizer = module.configure_optimizers()["optimizer"]
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
    nn.functional.cross_entropy(module(x), y).backward()
    named = [(n, p) for n, p in features.named_parameters() if p.requires_grad]
    by_hand = np.array([np.linalg.norm(p.grad.numpy()) / np.linalg.norm(p.detach().numpy()) for _, p in named])
    by_hand /= by_hand.max()
    ours = relative_grad_norms([p for _, p in named]).numpy()
    np.testing.assert_allclose(ours, by_hand, rtol=1e-5)
    callback = RelativeGradNormLR()
    callback.on_before_optimizer_step(None, module, optimizer)
    rgn_groups = [g for g in optimizer.param_groups if g.get("auto_rgn")]
    assert [g["name"] for g in rgn_groups] == [n for n, _ in named]
    np.testing.assert_allclose([g["lr"] for g in rgn_groups], 0.002 * by_hand, rtol=1e-5)
    head_group = next(g for g in optimizer.param_groups if not g.get("auto_rgn"))
    assert head_group["lr"] == 0.01, "the head keeps its own rate"
    assert callback.mean_multipliers() == pytest.approx(
        dict(zip([n for n, _ in named], by_hand, strict=True)), rel=1e-5
    )
