"""Where a run's tensors live: the training device, small in-memory datasets moved onto it once, pinned memory for
the rest, channels-last convolutions on GPUs. Read from ``cfg.trainer`` in one place, for every regime."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import DataLoader

from fmtransfer.errors import ConfigError
from fmtransfer.heads import InMemoryDataset, ResidentBatches, feature_loader

MiB = 2**20


def training_device(cfg: DictConfig) -> torch.device | None:
    """The one device a run trains on, or None when it may run several processes (DDP picks each rank's device and
    feeds it through distributed samplers) or names an accelerator this machine does not have."""
    t = cfg.trainer
    devices = t.get("devices", 1)
    if isinstance(devices, (list, tuple, ListConfig)) and len(devices) == 1:
        index = int(devices[0])
    elif devices in (1, "1"):
        index = 0  # Lightning's devices=1 is the first device
    else:
        return None
    if t.get("num_nodes", 1) != 1:
        return None
    if uses_cuda(cfg):
        return torch.device("cuda", index)
    return torch.device("cpu") if t.accelerator in ("cpu", "auto") else None


def uses_cuda(cfg: DictConfig) -> bool:
    """Whether this run's Trainer will put the model on a CUDA GPU."""
    accelerator = cfg.trainer.accelerator
    return torch.cuda.is_available() and accelerator in ("gpu", "cuda", "auto")


def channels_last(cfg: DictConfig) -> bool:
    """``trainer.channels_last``: ``auto`` (on CUDA GPUs, where NHWC convolutions use tensor cores), true or false."""
    value = cfg.trainer.get("channels_last", "auto")
    if value == "auto":
        return uses_cuda(cfg)
    if not isinstance(value, bool):
        raise ConfigError(f"trainer.channels_last={value!r} must be auto, true or false.")
    return value


def resident_limit_bytes(cfg: DictConfig) -> int:
    """``trainer.resident_data_mb`` in bytes: in-memory datasets up to this size are moved to the device once."""
    value = cfg.trainer.get("resident_data_mb", 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(
            f"trainer.resident_data_mb={value!r} must be a size in MiB (0 keeps every dataset behind a DataLoader)."
        )
    return int(value * MiB)


def feature_batches(
    dataset: InMemoryDataset, batch_size: int, shuffle: bool, cfg: DictConfig, drop_last: bool = False
) -> ResidentBatches | DataLoader:
    """Batches of an in-memory dataset (pooled features, cached prefix maps) for training or evaluation.

    On a single device and within ``trainer.resident_data_mb``, the tensors move to the device once and each step
    slices them there (``ResidentBatches``, order seeded by ``cfg.seed``); otherwise a DataLoader, with pinned
    memory when the model is on a GPU. Under several processes always a DataLoader (distributed samplers).
    """
    device = training_device(cfg)
    if device is not None and dataset.nbytes <= resident_limit_bytes(cfg):
        return ResidentBatches(dataset, batch_size, shuffle, device, seed=cfg.seed, drop_last=drop_last)
    return feature_loader(dataset, batch_size, shuffle, drop_last=drop_last, pin_memory=uses_cuda(cfg))
