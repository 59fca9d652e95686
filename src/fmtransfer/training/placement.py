"""Where a run's tensors live and in which precision: the training device, small in-memory datasets moved onto it
once, pinned memory for the rest, channels-last convolutions, bf16 autocast where the hardware runs it natively.
``resolve_placement`` and ``resolve_precision`` decide once per run, from plain values (with the hardware checks
injectable, so GPU and bf16 decisions are tested on any machine)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from fmtransfer.errors import ConfigError
from fmtransfer.heads import InMemoryDataset, ResidentBatches, feature_loader

MiB = 2**20


@dataclass(frozen=True)
class Placement:
    """``device``: the one device a run trains on, or None when it may run several processes (DDP picks each rank's
    device) or names an accelerator this machine does not have. ``cuda``: the model runs on a CUDA GPU (pinned host
    memory pays off). ``channels_last``: NHWC convolutions. ``resident_bytes``: in-memory datasets up to this size
    move to ``device`` once."""

    device: torch.device | None
    cuda: bool
    channels_last: bool
    resident_bytes: int


def resolve_placement(
    accelerator: str,
    devices: int | str | Sequence[int],
    num_nodes: int,
    channels_last: bool | str,
    resident_data_mb: float,
    cuda_available: bool | None = None,
) -> Placement:
    """The placement of a run with these Trainer settings (``trainer.*``); ``cuda_available`` defaults to asking
    torch. ``channels_last``: true, false or ``auto``: on CUDA GPUs (tensor-core convolutions) and on the CPU, where
    oneDNN's NHWC kernels measured faster too (lite0 at 224 px, 2 cores: forward 1.6x on AVX2 and 1.6-1.9x on
    AVX512 EPYCs, training step 1.4x on AVX2); off on other accelerators."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    cuda = cuda_available and accelerator in ("gpu", "cuda", "auto")
    if channels_last == "auto":
        channels_last = cuda or accelerator in ("cpu", "auto")
    elif not isinstance(channels_last, bool):
        raise ConfigError(f"trainer.channels_last={channels_last!r} must be auto, true or false.")
    if isinstance(resident_data_mb, bool) or not isinstance(resident_data_mb, (int, float)) or resident_data_mb < 0:
        raise ConfigError(
            f"trainer.resident_data_mb={resident_data_mb!r} must be a size in MiB (0 keeps every dataset behind a "
            "DataLoader)."
        )
    return Placement(
        _single_device(accelerator, devices, num_nodes, cuda), cuda, channels_last, int(resident_data_mb * MiB)
    )


@dataclass(frozen=True)
class Precision:
    """Lightning precision per kind of work: ``extraction`` (the frozen backbone's forward), ``backbone`` (training
    that runs a trainable backbone part: partial, finetune, scratch) and ``head`` (a head on cached features)."""

    extraction: str
    backbone: str
    head: str


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Elsewhere (e.g. an AVX2-only laptop) oneDNN
    emulates bf16, slower than fp32, so ``auto`` keeps fp32 there."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # Lightning's mixed precisions


def in_precision(precision: str, device_type: str) -> torch.autocast:
    """What Lightning runs a step in under ``precision``: autocast for the mixed precisions, and autocast off
    (float32) otherwise, also inside an outer autocast."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


class InPrecision(nn.Module):
    """``module`` (tensor in, ``{name: tensor}`` out) run in a Lightning ``precision`` wherever it is called, its
    outputs as float32: a frozen backbone computing what the cache would hold, inside a step of another precision."""

    def __init__(self, module: nn.Module, precision: str):
        super().__init__()
        self.module, self.precision = module, precision

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with in_precision(self.precision, x.device.type):
            out = self.module(x)
        return {k: v.float() for k, v in out.items()}


def resolve_precision(precision: str, cuda: bool, native_bf16: bool | None = None) -> Precision:
    """``trainer.precision``: a Lightning precision (``32-true``, ``bf16-mixed``, ...) for everything, or ``auto``:
    bf16-mixed autocast for extraction and backbone training where the device has native bf16 (a CUDA GPU that
    supports it, a CPU with AVX512-BF16/AMX), fp32 elsewhere and for heads (small layers, where bf16 buys nothing
    and rounds the inputs). ``native_bf16`` defaults to asking the hardware."""
    if precision != "auto":
        return Precision(precision, precision, precision)
    if native_bf16 is None:
        native_bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16()
    fast = "bf16-mixed" if native_bf16 else "32-true"
    return Precision(fast, fast, "32-true")


def _single_device(accelerator: str, devices, num_nodes: int, cuda: bool) -> torch.device | None:
    if isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) == 1:
        index = int(devices[0])
    elif devices in (1, "1"):
        index = 0  # Lightning's devices=1 is the first device
    else:
        return None
    if num_nodes != 1:
        return None
    if cuda:
        return torch.device("cuda", index)
    return torch.device("cpu") if accelerator in ("cpu", "auto") else None


def feature_batches(
    dataset: InMemoryDataset,
    batch_size: int,
    shuffle: bool,
    placement: Placement,
    seed: int,
    drop_last: bool = False,
) -> ResidentBatches | DataLoader:
    """Batches of an in-memory dataset (pooled features, cached prefix maps) for training or evaluation.

    On a single device and within ``placement.resident_bytes``, the tensors move to the device once and each step
    slices them there (``ResidentBatches``, order seeded by ``seed``); otherwise a DataLoader, with pinned memory
    when the model is on a GPU. Under several processes always a DataLoader (distributed samplers).
    """
    if placement.device is not None and dataset.nbytes <= placement.resident_bytes:
        return ResidentBatches(dataset, batch_size, shuffle, placement.device, seed=seed, drop_last=drop_last)
    return feature_loader(dataset, batch_size, shuffle, drop_last=drop_last, pin_memory=placement.cuda)
