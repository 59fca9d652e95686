"""A split decoded once into uint8 image tensors, for runs that read its images every epoch (the live regimes).

Decoding is the cost a per-epoch loader pays again each epoch; here it is paid once per process: every later run
of the process (a comparison's folds, candidates and seeds) that asks for the same split, prepared the same way,
gets the same tensors, within a memory bound.
"""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
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


_DECODED: OrderedDict[tuple[str, str, str], DecodedImages] = OrderedDict()

Origin = tuple[Sequence[str], np.ndarray]  # a split's rows as (base split name, row in it) pairs


def decode(
    split: Dataset,
    prepare: Prepare,
    memo_bytes: int = 0,
    device: torch.device | None = None,
    origin: Origin | None = None,
    bases: Mapping[str, Dataset] | None = None,
) -> DecodedImages:
    """``split``'s images through ``prepare`` (an RGB PIL image to a uint8 tensor), on ``device`` (default: host
    memory), decoded once per process: a later call for the same split, ``prepare`` (by its repr) and device returns
    the same tensors. A split made of other splits' rows (``origin``: a cross-validation fold, whose rows come from
    ``bases``) takes its rows' tensors from those splits' decoded images: every fold of a comparison shares them.
    The process keeps at most ``memo_bytes`` of decoded images, the least recently asked for go first."""
    if origin is not None and bases is not None:
        names, rows = origin
        decoded = {name: decode(bases[name], prepare, memo_bytes, device) for name in dict.fromkeys(names)}
        images = [decoded[name].images[int(row)] for name, row in zip(names, rows, strict=True)]
        return DecodedImages(images, label_array(split))
    fingerprint = getattr(split, "_fingerprint", None)
    key = (str(fingerprint), repr(prepare), str(device))
    if fingerprint is not None and key in _DECODED:
        _DECODED.move_to_end(key)
        return _DECODED[key]
    images = [prepare(to_rgb(row["image"])) for row in split]
    if device is not None:
        images = [image.to(device) for image in images]
    decoded = DecodedImages(images, label_array(split))
    if fingerprint is not None and decoded.nbytes <= memo_bytes:
        _DECODED[key] = decoded
        while sum(d.nbytes for d in _DECODED.values()) > memo_bytes:
            _DECODED.popitem(last=False)
    log.info(f"decoded {len(decoded)} images once ({decoded.nbytes / 2**20:.0f} MiB)")
    return decoded
