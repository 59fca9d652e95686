"""A split decoded once into uint8 image tensors, for runs that read its images every epoch (the live regimes).

Decoding is the cost a per-epoch loader pays again each epoch; here it is paid once per process: every later run
of the process (a comparison's folds, candidates and seeds) that asks for the same split, prepared the same way,
gets the same tensors, within a memory bound.
"""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from fmtransfer.data.images import label_array, to_rgb

log = logging.getLogger(__name__)

Prepare = Callable[[Image.Image], torch.Tensor]  # an RGB image -> [3, H, W] uint8


class DecodedImages(torch.utils.data.Dataset):
    """A split's images as ``[3, H, W]`` uint8 tensors (sizes may differ), as ``(image, label, index)``."""

    def __init__(self, images: list[torch.Tensor], labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.images[index], int(self.labels[index]), index

    @property
    def nbytes(self) -> int:
        return sum(image.numel() for image in self.images)

    def to(self, device: torch.device) -> DecodedImages:
        return DecodedImages([image.to(device) for image in self.images], self.labels)


def image_sizes(split: Dataset) -> list[tuple[int, int]]:
    """Every image's ``(width, height)`` from its file header (nothing decoded)."""
    raw = split.cast_column("image", ImageFeature(decode=False)).select_columns(["image"])
    sizes = []
    for image in raw["image"]:
        source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else Path(image["path"])
        with Image.open(source) as header:
            sizes.append(header.size)
    return sizes


def decoded_bytes(split: Dataset, size: tuple[int, int] | None = None) -> int:
    """What ``decode`` keeps of ``split``: every image at its own size, or at ``size`` (h, w) when prepared to one."""
    if size is not None:
        return len(split) * 3 * size[0] * size[1]
    return sum(3 * w * h for w, h in image_sizes(split))


_DECODED: OrderedDict[tuple[str, str], DecodedImages] = OrderedDict()


def decode(split: Dataset, prepare: Prepare, memo_bytes: int = 0) -> DecodedImages:
    """``split``'s images through ``prepare`` (an RGB PIL image to a uint8 tensor), decoded once per process: a
    later call for the same split and the same ``prepare`` (by its repr) returns the same tensors. The process keeps
    at most ``memo_bytes`` of them, the least recently asked for go first."""
    fingerprint = getattr(split, "_fingerprint", None)
    key = (str(fingerprint), repr(prepare))
    if fingerprint is not None and key in _DECODED:
        _DECODED.move_to_end(key)
        return _DECODED[key]
    images = [prepare(to_rgb(row["image"])) for row in split]
    decoded = DecodedImages(images, label_array(split))
    if fingerprint is not None and decoded.nbytes <= memo_bytes:
        _DECODED[key] = decoded
        while sum(d.nbytes for d in _DECODED.values()) > memo_bytes:
            _DECODED.popitem(last=False)
    log.info(f"decoded {len(decoded)} images once ({decoded.nbytes / 2**20:.0f} MiB)")
    return decoded
