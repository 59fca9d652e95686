"""timm's image transforms on decoded uint8 tensors, on whichever device holds them: a split is decoded once and
every epoch's augmentation runs on batches (on the GPU when there is one), not on PIL images in loader workers.

The training transform keeps timm's own ops and random draws (its random-resized-crop parameters, flip and colour
jitter draw from the same generators, in the same order); only the crop's resize runs on the tensor (torchvision's
antialiased resize, same interpolation) instead of on the PIL image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation, ToTensor
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

# Ops of timm's training transform that take a uint8 image tensor as they take a PIL image.
TENSOR_OPS = (transforms.RandomHorizontalFlip, transforms.RandomVerticalFlip, transforms.ColorJitter)
TO_TENSOR = (MaybeToTensor, ToTensor, transforms.ToTensor)


class NotOnTensors(ValueError):
    """A transform with an op that has no tensor counterpart here (e.g. AutoAugment, random erasing)."""


def _split_at_to_tensor(transform: transforms.Compose) -> tuple[list, transforms.Normalize]:
    """The ops before timm's tensor conversion, and the ``Normalize`` right after it (nothing else after)."""
    ops = list(getattr(transform, "transforms", [transform]))
    at = next((i for i, op in enumerate(ops) if isinstance(op, TO_TENSOR)), None)
    after = ops[at + 1 :] if at is not None else []
    if not after or not isinstance(after[0], transforms.Normalize):
        raise NotOnTensors(f"{transform!r}: expected a tensor conversion, then Normalize")
    if len(after) > 1:
        raise NotOnTensors(f"{after[1:]} have no tensor counterpart here")
    return ops[:at], after[0]


def normalise(images: torch.Tensor, normalize: transforms.Normalize) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` to floats as timm's tensor conversion and ``Normalize`` make them (the same ops)."""
    return F.normalize(images.to(torch.get_default_dtype()).div(255), normalize.mean, normalize.std)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as ``[3, H, W]`` uint8."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class TensorAugment:
    """timm's training transform (random resized crop, flips, colour jitter, normalisation) on a batch of decoded
    ``[3, H, W]`` uint8 images of any sizes, on their device: ``[N, 3, h, w]`` floats. Raises ``NotOnTensors`` for
    a transform it cannot run on tensors."""

    def __init__(self, transform: transforms.Compose):
        ops, self.normalize = _split_at_to_tensor(transform)
        if not ops or not isinstance(ops[0], RandomResizedCropAndInterpolation):
            raise NotOnTensors(f"{transform!r}: expected a random resized crop first")
        self.crop = ops[0]
        if not isinstance(self.crop.interpolation, InterpolationMode):  # timm's "random" interpolation
            raise NotOnTensors(f"{self.crop!r}: a random interpolation has no tensor counterpart here")
        self.ops = ops[1:]
        unknown = [op for op in self.ops if not isinstance(op, TENSOR_OPS)]
        if unknown:
            raise NotOnTensors(f"{unknown} have no tensor counterpart here")

    def crop_box(self, image: torch.Tensor) -> tuple[int, int, int, int]:
        """``(top, left, height, width)``: timm's own draw for this image (Python's ``random``)."""
        return self.crop.get_params(image, self.crop.scale, self.crop.ratio)

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        top, left, height, width = self.crop_box(image)
        out = F.resized_crop(
            image, top, left, height, width, list(self.crop.size), self.crop.interpolation, antialias=True
        )
        for op in self.ops:
            out = op(out)
        return out

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        return normalise(torch.stack([self.augment(image) for image in images]), self.normalize)

    def __repr__(self) -> str:
        return f"TensorAugment({self.crop!r}, {self.ops!r}, {self.normalize!r})"


class TensorEval:
    """timm's evaluation transform split in two: its resize and centre crop on the PIL image, once (``prepare``:
    uint8 tensors of the final size), and its normalisation on batches on their device (``__call__``). The floats are
    those timm's whole transform makes."""

    def __init__(self, transform: transforms.Compose):
        ops, self.normalize = _split_at_to_tensor(transform)
        self.resize_crop: Callable[[Image.Image], Image.Image] = transforms.Compose(ops)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        return to_uint8_tensor(self.resize_crop(image))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return normalise(images, self.normalize)

    def __repr__(self) -> str:
        return f"TensorEval({self.resize_crop!r}, {self.normalize!r})"


class JpegEval:
    """timm's evaluation transform for JPEG files decoded by torchvision on the extracting device (nvJPEG on a GPU):
    the encoded bytes of a batch in, normalised ``[N, 3, h, w]`` out, resize and crop on the tensors (antialiased,
    the same interpolation; the floats differ from PIL's by resampling only, so the cache keys them apart)."""

    def __init__(self, transform: transforms.Compose):
        self.eval = TensorEval(transform)

    def __call__(self, encoded: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        decoded = decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device)
        return self.eval(torch.stack([self.eval.resize_crop(image) for image in decoded]))

    def __repr__(self) -> str:
        return f"JpegEval(torchvision decode_jpeg on the device, {self.eval!r})"
