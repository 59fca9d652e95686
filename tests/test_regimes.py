"""Partial regime: exact split of the backbone, frozen prefix untouched, optimisers see trainable parameters only."""

from __future__ import annotations

import copy
import resource
import time

import pytest
import pytorch_lightning as pl
import torch

from fmtransfer.backbone import FeatureMapExtractor, build_suffix, describe_backbone, split_level
from fmtransfer.errors import ConfigError
from fmtransfer.heads import HeadClassifier, LinearProbeHead
from fmtransfer.regimes.live import PreLogitsOf
from fmtransfer.regimes.partial import LivePrefix
from fmtransfer.training import PeakMemory, validation_interval

from .conftest import bare_trainer


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_suffix_of_the_prefix_output_is_the_whole_network(name):
    spec = describe_backbone(name, weights="random")
    model = spec.create()[0]
    x = torch.randn(2, 3, 64, 64)
    for k in range(1, 5):
        level = split_level(list(spec.levels), k)
        ext = FeatureMapExtractor(model, [level, spec.levels[-1]])
        with torch.no_grad():
            out = ext(x)
            assert torch.allclose(build_suffix(model, level)(out[level.name]), out["pre_logits"], atol=1e-5)


def test_k_out_of_range_is_a_config_error():
    spec = describe_backbone("tf_efficientnet_lite0", weights="random")
    with pytest.raises(ConfigError, match=r"regime\.k=5 .*between 1 and 4"):
        split_level(list(spec.levels), 5)


def test_live_prefix_stays_frozen_while_the_suffix_trains():
    spec = describe_backbone("tf_efficientnet_lite0", weights="random")
    model = spec.create()[0]
    level = split_level(list(spec.levels), 1)
    prefix = LivePrefix(FeatureMapExtractor(copy.deepcopy(model), [level]), level.name)
    suffix = build_suffix(model, level).requires_grad_(True)
    head = LinearProbeHead({"pre_logits": 1280}, 3)
    module = HeadClassifier(
        head, 3, lr=0.01, backbone_lr=0.001, features=torch.nn.Sequential(prefix, PreLogitsOf(suffix))
    )
    prefix_before = copy.deepcopy(prefix.state_dict())
    suffix_before = copy.deepcopy(suffix.state_dict())

    groups = module.configure_optimizers()["optimizer"].param_groups
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    assert not any(p.requires_grad for p in prefix.parameters())
    assert sorted(g["lr"] for g in groups) == [0.001, 0.01]
    # A backbone rate of 0 is 0 (the backbone kept as it is), not the head's rate.
    kept = HeadClassifier(copy.deepcopy(head), 3, lr=0.01, backbone_lr=0.0, features=module.features)
    assert sorted(g["lr"] for g in kept.configure_optimizers()["optimizer"].param_groups) == [0.0, 0.01]

    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 3, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    bare_trainer().fit(module, loader)
    after = prefix.state_dict()
    assert all(torch.equal(prefix_before[k], after[k]) for k in prefix_before), "prefix (incl. BN buffers) changed"
    assert any(not torch.equal(suffix_before[k], v) for k, v in suffix.state_dict().items()), "suffix did not train"


class _BatchNormModes(pl.Callback):
    """Records whether the backbone's BatchNorm layers are in train mode during training steps."""

    def __init__(self):
        self.modes: set[bool] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        bns = [m for m in pl_module.features.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self.modes |= {m.training for m in bns}


@pytest.mark.parametrize(("fixed", "expected"), [(False, {True}), (True, {False})])
def test_trainable_backbone_batchnorm_mode_during_training(tmp_path, tiny_overrides, fixed, expected):
    """Regression: Lightning keeps module modes at fit start, and backbones are built in eval mode."""
    from fmtransfer.cli.config import compose_config
    from fmtransfer.regimes import run_regime

    cfg = compose_config(
        [
            *tiny_overrides,
            "data.shots_per_class=3",
            "regime=scratch",
            "regime.epochs=1",
            "regime.min_steps=1",
            "regime.image_size=32",
            f"regime.fixed_bn_stats={str(fixed).lower()}",
        ]
    )
    modes = _BatchNormModes()
    metrics = run_regime(cfg, tmp_path / "run", callbacks=[modes])
    assert modes.modes == expected
    assert metrics["trainable_params"] > 4_000_000


def test_peak_memory_counts_a_block_allocations_after_bigger_freed_ones():
    """In one process (a comparison's runs), memory freed by an earlier run must not hide a later run's peak."""
    mb, block = 2**20, 2**16
    torch.ones(8 * mb // 4)  # freeing an 8 MB mmap makes glibc serve smaller blocks from its heap from then on
    earlier = [torch.ones(block // 4) for _ in range(300 * mb // block)]  # 300 MB in the heap, kept once freed
    del earlier
    with PeakMemory("cpu") as memory:
        held = [torch.ones(block // 4) for _ in range(200 * mb // block)]  # 200 MB live at the block's peak
        time.sleep(0.1)  # at least a few of the 20 ms samples while it is held
        del held
    assert memory.kind == "cpu_heap_in_use"
    assert 150 * mb < memory.peak_bytes < 400 * mb


def test_peak_memory_leaves_freed_memory_mapped_for_the_block_to_reuse():
    """Measuring must not hand freed memory back to the OS: a run's first batches would fault every page in again
    (on a real fit, 70-110 thousand faults and 1.5x the time of a later validation pass)."""
    mb, block = 2**20, 2**16
    torch.ones(8 * mb // 4)  # from now on, 64 KB blocks come from the heap
    earlier = [torch.ones(block // 4) for _ in range(100 * mb // block)]
    del earlier  # 100 MB free in the heap, its pages still mapped
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with PeakMemory("cpu") as memory:
        held = [torch.ones(block // 4) for _ in range(100 * mb // block)]
        time.sleep(0.15)  # a few of the 50 ms samples while it is held
        del held
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert faults < 0.1 * 100 * mb / resource.getpagesize()  # the old malloc_trim(0) at start: every page, 25,600
    assert 90 * mb < memory.peak_bytes < 200 * mb


def test_validation_interval_keeps_about_the_requested_number_of_validations():
    assert validation_interval(30, 20) == 1  # 30 one-step epochs, about 20 validations: after every epoch
    assert validation_interval(30, 5) == 6 and 30 // validation_interval(30, 5) == 5
    assert validation_interval(150, 20) == 7
    with pytest.raises(ConfigError, match=r"trainer\.validations_per_run=0"):
        validation_interval(30, 0)


def test_bf16_mixed_training_and_extraction_run_on_the_cpu(tmp_path, tiny_overrides):
    """The GPU's precision path (bf16 autocast) exercised where the CPU can: a partial run trains its suffix in
    bf16-mixed and says so; the frozen head's cache is extracted in bf16 too."""
    from fmtransfer.cli.config import compose_config
    from fmtransfer.regimes import run_regime

    overrides = [*tiny_overrides, "trainer.precision=bf16-mixed", "data.shots_per_class=3"]
    partial = run_regime(
        # one cached view: bf16 is emulated (slow) on CPUs without native bf16, and the views have their own tests
        compose_config([*overrides, "regime=partial", "regime.epochs=1", "regime.min_steps=2", "regime.views=1"]),
        tmp_path / "p",
    )
    assert partial["precision"] == {"training": "bf16-mixed", "extraction": "bf16-mixed"}
    assert 0.0 <= partial["test"]["acc"] <= 1.0 and partial["epochs"] >= 1
    frozen = run_regime(compose_config(overrides), tmp_path / "f")
    assert frozen["precision"]["extraction"] == "bf16-mixed"
    assert frozen["test"]["acc"] > 0.3, "3 shots of real digits on bf16 features still beat chance (0.1)"
