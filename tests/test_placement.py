"""Where tensors live: resident batches on the training device, DataLoader fallback, channels-last backbones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from fmtransfer.backbone import FeatureMapExtractor, describe_backbone, to_channels_last
from fmtransfer.errors import ConfigError
from fmtransfer.heads import CachedMapDataset, PooledFeatureDataset, ResidentBatches
from fmtransfer.training import (
    Placement,
    Precision,
    cpu_has_native_bf16,
    feature_batches,
    resolve_placement,
    resolve_precision,
)
from fmtransfer.training.allocator import glibc


def pooled_dataset(n: int = 10) -> PooledFeatureDataset:
    features = {"a": torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 4), "b": torch.randn(n, 2)}
    return PooledFeatureDataset(features, torch.arange(n) % 3)


def placement(cuda_available: bool = False, **trainer) -> Placement:
    """``resolve_placement`` of these ``trainer.*`` settings, on a machine with or without a CUDA GPU."""
    base = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "resident_data_mb": 1, "channels_last": "auto"}
    return resolve_placement(**{**base, **trainer}, cuda_available=cuda_available)


def epoch_ids(batches) -> list[list[int]]:
    return [batch[0]["a"][:, 0].long().tolist() for batch in batches]


def test_resident_batches_cover_every_sample_once_per_epoch_in_a_new_seeded_order():
    batches = ResidentBatches(pooled_dataset(10), batch_size=4, shuffle=True, device="cpu", seed=3)
    assert len(batches) == 3
    first, second = epoch_ids(batches), epoch_ids(batches)
    assert [len(b) for b in first] == [4, 4, 2]
    for epoch in (first, second):
        assert sorted(i for b in epoch for i in b) == list(range(10))
    assert first != second, "the order must change between epochs"
    again = ResidentBatches(pooled_dataset(10), batch_size=4, shuffle=True, device="cpu", seed=3)
    assert epoch_ids(again) == first, "the same seed must give the same order"
    # Labels travel with their features.
    features, labels = next(iter(batches))
    assert torch.equal(labels, features["a"][:, 0].long() % 3)


def test_resident_batches_in_order_and_drop_last_like_a_dataloader():
    dataset = pooled_dataset(10)
    assert epoch_ids(ResidentBatches(dataset, 4, shuffle=False, device="cpu")) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dropped = ResidentBatches(dataset, 4, shuffle=True, device="cpu", drop_last=True)
    assert len(dropped) == len(DataLoader(dataset, batch_size=4, drop_last=True)) == 2
    assert [len(b) for b in epoch_ids(dropped)] == [4, 4]


def test_cached_maps_are_served_as_float32_batches_from_float16_storage():
    maps = torch.randn(6, 3, 2, 2).half()
    batches = ResidentBatches(CachedMapDataset(maps, torch.arange(6)), 4, shuffle=False, device="cpu")
    x, y = next(iter(batches))
    assert x.dtype == torch.float32 and torch.equal(x, maps[:4].float()) and torch.equal(y, torch.arange(4))


def test_feature_batches_resident_within_the_limit_else_a_dataloader():
    small = pooled_dataset(10)
    assert isinstance(feature_batches(small, 4, True, placement(), seed=7), ResidentBatches)
    assert isinstance(feature_batches(small, 4, True, placement(resident_data_mb=0), seed=7), DataLoader)
    # Several processes (DDP): distributed samplers need a DataLoader.
    assert placement(devices=2).device is None
    assert isinstance(feature_batches(small, 4, True, placement(devices=2), seed=7), DataLoader)
    assert placement(devices=[0]).device == torch.device("cpu")
    assert placement(num_nodes=2).device is None


@pytest.mark.parametrize(
    ("key", "value"), [("resident_data_mb", "lots"), ("resident_data_mb", -1), ("channels_last", "yes")]
)
def test_bad_placement_settings_name_the_option(key, value):
    with pytest.raises(ConfigError, match=f"trainer.{key}"):
        placement(**{key: value})


def test_channels_last_auto_is_on_for_cpus_and_cuda_and_can_be_turned_off():
    assert placement().channels_last is True  # NHWC convolutions measured faster on CPUs too
    assert placement(channels_last=False).channels_last is False
    assert placement(cuda_available=True, channels_last=False).channels_last is False
    assert placement(accelerator="mps").channels_last is False


@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_on_a_gpu_the_run_trains_on_it_with_pinned_memory_and_channels_last(accelerator):
    """The GPU decisions, with the device choice injected (this machine has no GPU)."""
    p = placement(cuda_available=True, accelerator=accelerator, devices=[1])
    assert p.device == torch.device("cuda", 1) and p.cuda and p.channels_last
    assert placement(cuda_available=True, accelerator="cpu") == placement(cuda_available=False)
    # A GPU asked for on a machine without one: no single device to move data to, nothing pinned.
    gpu_less = placement(cuda_available=False, accelerator="gpu")
    assert gpu_less.device is None and not gpu_less.cuda and not gpu_less.channels_last


def test_auto_precision_is_bf16_for_backbones_only_where_the_hardware_has_it():
    assert resolve_precision("auto", cuda=False, native_bf16=True) == Precision("bf16-mixed", "bf16-mixed", "32-true")
    # An AVX2-only CPU would emulate bf16, slower than fp32: auto keeps fp32.
    assert resolve_precision("auto", cuda=False, native_bf16=False) == Precision("32-true", "32-true", "32-true")
    assert resolve_precision("auto", cuda=True, native_bf16=True).extraction == "bf16-mixed"
    # An explicit precision is used for everything, as before.
    assert resolve_precision("32-true", cuda=True, native_bf16=True) == Precision("32-true", "32-true", "32-true")
    assert resolve_precision("bf16-mixed", cuda=False, native_bf16=False).head == "bf16-mixed"
    assert isinstance(cpu_has_native_bf16(), bool)


def test_pinned_dataloader_when_the_model_is_on_a_gpu_but_the_data_is_too_big_to_move():
    p = placement(cuda_available=True, accelerator="gpu", resident_data_mb=0)
    loader = feature_batches(pooled_dataset(10), 4, True, p, seed=0)
    assert isinstance(loader, DataLoader) and loader.pin_memory


def test_channels_last_backbone_gives_the_same_maps_and_parameter_names():
    spec = describe_backbone("tf_efficientnet_lite0", weights="random")
    model = spec.create()[0].eval()
    levels = [spec.levels[1], spec.levels[-1]]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = FeatureMapExtractor(model, levels)(x)
        names = list(model.state_dict())
        converted = to_channels_last(to_channels_last(model))  # twice: still one input hook
        got = FeatureMapExtractor(converted, levels)(x)
    assert len(converted._forward_pre_hooks) == 1
    assert list(converted.state_dict()) == names
    assert converted.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name].numpy(), value.numpy(), rtol=1e-4, atol=1e-4)


class _InputLayout(pl.Callback):
    """Records the layout the trainable backbone part sees and the type of the training batches' source."""

    def __init__(self):
        self.weights_channels_last: set[bool] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        convs = [m for m in pl_module.features.modules() if isinstance(m, torch.nn.Conv2d)]
        self.weights_channels_last |= {c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs}


def test_channels_last_extraction_and_partial_training_end_to_end(tmp_path, tiny_overrides):
    """A real cache built in NHWC holds the same maps as the NCHW one; partial trains its suffix in NHWC from it."""
    from fmtransfer.cache import CachedSplit, FeatureCache
    from fmtransfer.cli.config import compose_config
    from fmtransfer.regimes import run_regime

    runs = {}
    for layout in ("true", "false"):
        # fp32 on every CPU: the layouts are compared, not bf16's rounding (on native-bf16 CPUs auto picks bf16)
        overrides = [
            *tiny_overrides,
            f"cache.dir={tmp_path / layout}",
            f"trainer.channels_last={layout}",
            "trainer.precision=32-true",
        ]
        runs[layout] = run_regime(compose_config(overrides), tmp_path / f"frozen-{layout}")
    for split, path in runs["true"]["cache"]["entries"].items():
        nhwc, nchw = (
            CachedSplit(Path(p), FeatureCache.read_manifest(Path(p)))
            for p in (path, runs["false"]["cache"]["entries"][split])
        )
        assert nhwc.manifest["fingerprint"] == nchw.manifest["fingerprint"]
        for level in nchw.manifest["levels"]:
            np.testing.assert_allclose(nhwc.load(level), nchw.load(level), rtol=1e-3, atol=1e-3)

    layout = _InputLayout()
    overrides = [
        *tiny_overrides,
        f"cache.dir={tmp_path / 'true'}",
        "trainer.channels_last=true",
        "trainer.precision=32-true",  # the NHWC cache above
        "regime=partial",
        "regime.epochs=1",
        "regime.min_steps=2",
    ]
    metrics = run_regime(compose_config(overrides), tmp_path / "partial", callbacks=[layout])
    assert layout.weights_channels_last == {True}
    assert 0.0 <= metrics["test"]["acc"] <= 1.0 and metrics["epochs"] >= 1


def test_depthwise_backward_in_float32_keeps_the_bf16_forward_and_computes_exact_float32_gradients():
    """Under CPU bf16 autocast a swapped depthwise convolution (timm's TF "same"-padded one, stride 2) gives the
    same bf16 output as autocast's, and the gradients a float32 convolution gives on the same bf16-rounded input and
    incoming gradient (closer to them than autocast's bf16 backward); outside autocast, and its state dict,
    unchanged."""
    import copy

    import timm
    import torch.nn.functional as F
    from timm.layers.padding import pad_same

    from fmtransfer.backbone import depthwise_backward_in_float32

    torch.manual_seed(0)
    conv = timm.create_model("tf_efficientnet_lite0").blocks[1][0].conv_dw
    assert conv.groups == conv.in_channels > 1 and conv.stride == (2, 2)
    fast = depthwise_backward_in_float32(copy.deepcopy(conv))
    assert list(fast.state_dict()) == list(conv.state_dict())
    x = torch.randn(4, conv.in_channels, 28, 28).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with torch.no_grad():
        assert torch.equal(fast(x), conv(x)), "outside autocast: the module as it was"
    with torch.autocast("cpu", torch.bfloat16):
        slow_out, fast_out = conv(x), fast(x)
    assert fast_out.dtype == torch.bfloat16 and torch.equal(fast_out, slow_out)
    grad = torch.randn_like(slow_out)
    slow = torch.autograd.grad(slow_out, [x, conv.weight], grad)
    ours = torch.autograd.grad(fast_out, [x, fast.weight], grad)
    rounded = x.detach().to(torch.bfloat16).float().requires_grad_(True)
    weight = conv.weight.detach().clone().requires_grad_(True)
    out = F.conv2d(
        pad_same(rounded, conv.kernel_size, conv.stride, conv.dilation), weight, None, conv.stride, 0, 1, conv.groups
    )
    reference = torch.autograd.grad(out, [rounded, weight], grad.to(torch.bfloat16).float())
    for mine, theirs, ref in zip(ours, slow, reference, strict=True):
        assert mine.dtype == ref.dtype == torch.float32
        assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-5)
        assert (mine - ref).abs().max() < (theirs.float() - ref).abs().max()


# Run in a fresh process, with the allocator module loaded alone (no torch: the process's heap is this script's).
FAULTS_SCRIPT = """
import importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("allocator", sys.argv[2])
allocator = sys.modules["allocator"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
if sys.argv[1] == "tuned":
    assert allocator.tune_malloc(allocator.MallocSettings(mmap_threshold_mb=256, trim_threshold_mb=1024))
size = 64 * 2**20
block = b"x" * size  # the heap grows once
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    block = b"x" * size  # a batch's activations, made and freed step after step
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(glibc() is None, reason="the C library is not glibc: trainer.malloc leaves it alone")
def test_trainer_malloc_keeps_a_steps_freed_memory_mapped_for_the_next():
    """glibc maps every 64 MiB block anew (a page fault per 4 KiB page, every time); with ``trainer.malloc``'s
    thresholds the freed block is reused from the heap. Counted by the kernel (minor faults)."""
    import subprocess
    import sys

    from fmtransfer.training import allocator

    def faults(mode: str) -> int:
        command = [sys.executable, "-c", FAULTS_SCRIPT, mode, allocator.__file__]
        return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])

    pages = 10 * 64 * 2**20 // 4096
    assert faults("default") > 0.9 * pages
    assert faults("tuned") < 0.1 * pages


@pytest.mark.parametrize("value", [{"mmap_threshold_mb": 256}, {"mmap_threshold_mb": -1, "trim_threshold_mb": 1}, 5])
def test_bad_malloc_settings_name_the_option(value):
    from fmtransfer.training.allocator import malloc_settings

    with pytest.raises(ConfigError, match=r"trainer\.malloc"):
        malloc_settings(value)


def test_importing_fmtransfer_raises_onednn_s_primitive_cache_unless_the_user_set_it():
    """A comparison's runs compile more oneDNN primitives than its default cache (1,024) holds; set before oneDNN
    first reads it (on import), and never over a user's own value."""
    import os
    import subprocess
    import sys

    code = "import os, fmtransfer; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    theirs = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "100"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(ours.stdout) > 1024 and theirs.stdout.strip() == "100"


def _with_random_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (a random init has mean 0, var 1, gamma 1, beta 0)."""
    gen = torch.Generator().manual_seed(0)
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            for t, (lo, hi) in zip(
                (bn.running_mean, bn.running_var, bn.weight.data, bn.bias.data),
                ((-0.5, 0.5), (0.5, 2.0), (0.5, 1.5), (-0.2, 0.2)),
                strict=True,
            ):
                t.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=gen))
    return model


def test_fixed_batchnorm_statistics_folded_into_convolutions_give_the_same_outputs_and_gradients():
    """FixedBatchNormStats folds every BatchNorm of lite0 into its convolution from the first forward on: outputs and
    every parameter's gradient as the unfolded model's (float32), state dict keys unchanged; put back in train mode
    outside the wrapper, the BatchNorms normalise with batch statistics again."""
    import copy

    import timm

    from fmtransfer.backbone import FixedBatchNormStats, depthwise_backward_in_float32

    torch.manual_seed(0)
    model = _with_random_statistics(timm.create_model("tf_efficientnet_lite0"))
    reference = FixedBatchNormStats(copy.deepcopy(model), fold=False).train()
    folded = FixedBatchNormStats(depthwise_backward_in_float32(copy.deepcopy(model))).train()
    x = torch.randn(2, 3, 64, 64)
    folded(x[:1])  # the first forward confirms the pairs on its first sample, then runs folded
    batchnorms = [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(batchnorms) == 49 and all(
        getattr(m, "folded_batchnorm", ()) for m in folded.modules() if isinstance(m, torch.nn.Conv2d)
    )
    assert list(folded.state_dict()) == list(reference.state_dict())
    expected, out = reference(x), folded(x)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    expected.square().sum().backward()
    out.square().sum().backward()
    theirs = dict(reference.named_parameters())
    for name, p in folded.named_parameters():
        assert torch.allclose(p.grad, theirs[name].grad, rtol=1e-3, atol=1e-3 * theirs[name].grad.abs().max().item()), (
            name
        )
    folded.module.train()  # outside the wrapper: batch statistics again, as the plain model
    plain = copy.deepcopy(model).train()
    assert torch.allclose(folded.module(x), plain(x), atol=1e-4)


def test_a_batchnorm_that_does_not_take_its_neighbours_output_is_not_folded():
    """Registration order proposes a pair; the data flow of the first forward decides."""
    from fmtransfer.backbone import FixedBatchNormStats

    class NormThenConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.bn(x))

    module = _with_random_statistics(NormThenConv())
    wrapped = FixedBatchNormStats(module).train()
    x = torch.randn(2, 3, 8, 8)
    first = wrapped(x)
    assert not getattr(module.conv, "folded_batchnorm", ()) and type(module.bn) is torch.nn.BatchNorm2d
    assert torch.equal(wrapped(x), first)


def test_clamping_activations_run_in_the_convolutions_output_pass_with_the_same_values_and_gradients(monkeypatch):
    """A folded convolution applies the ReLU6 / ReLU after its BatchNorm in oneDNN's output pass: channels-last (as
    finetune runs), under CPU bf16 autocast and in float32, the output is bit for bit the convolution followed by the
    activation module, and the gradients of every parameter match; an activation that does not clamp (SiLU) is left
    to the BatchNorm."""
    import copy

    import timm
    from timm.layers import BatchNormAct2d

    import fmtransfer.backbone.convolution as convolution
    from fmtransfer.backbone import FixedBatchNormStats, depthwise_backward_in_float32, to_channels_last

    class ConvNormAct(torch.nn.Module):
        def __init__(self, act: type[torch.nn.Module]):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = BatchNormAct2d(8, act_layer=act)

        def forward(self, x):
            return self.bn(self.conv(x))

    torch.manual_seed(0)
    lite0 = to_channels_last(_with_random_statistics(timm.create_model("tf_efficientnet_lite0", num_classes=2)))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    for model, expected_fused in (
        (lite0, 33),  # the stem, every expansion and depthwise convolution, the head (ReLU6)
        (_with_random_statistics(ConvNormAct(torch.nn.ReLU)), 1),
        (_with_random_statistics(ConvNormAct(torch.nn.SiLU)), 0),
    ):
        for bf16 in (True, False):
            runs = []
            for fused in (True, False):
                monkeypatch.setattr(convolution, "_FUSED_OUTPUT_PASS", fused)
                wrapped = FixedBatchNormStats(depthwise_backward_in_float32(copy.deepcopy(model))).train()
                with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    wrapped(x[:1])
                    out = wrapped(x)
                out.float().square().sum().backward()
                runs.append((out, {n: p.grad for n, p in wrapped.named_parameters()}))
                activations = [m.fused_activation for m in wrapped.modules() if getattr(m, "fused_activation", None)]
                assert len(activations) == expected_fused
            (out, grads), (ref_out, ref_grads) = runs
            assert out.dtype == (torch.bfloat16 if bf16 else torch.float32) and torch.equal(out, ref_out)
            tolerance = 1e-2 if bf16 else 1e-5
            for name, g in grads.items():
                ref = ref_grads[name]
                assert torch.allclose(g, ref, rtol=tolerance, atol=tolerance * ref.abs().max().item()), name
