"""Measure what separates near-duplicate copies from distinct photos of a class (docs/leakage.md).

python scripts/leakage-threshold.py <image folder> [copies]: for a random sample of images, a copy resized to 90 % and
re-saved as JPEG quality 85; prints, for the backbone's pre-logits (cosine) and for the leakage check's thumbnails
(correlation), the lowest score of a copy with its original and the highest score of two distinct photos of a class.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fmtransfer.backbone import FeatureMapExtractor, build_eval_transform, describe_backbone, resolve_data_config
from fmtransfer.data.leakage import image_signatures, normalized


def near_copy(image: Image.Image) -> bytes:
    image = image.convert("RGB")
    image = image.resize((round(image.width * 0.9), round(image.height * 0.9)), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def thumbnails(encoded: list[bytes]) -> np.ndarray:
    """The check's own thumbnails (``image_signatures``: decoded as the check decodes them)."""
    return normalized(image_signatures([{"bytes": data, "path": None} for data in encoded])[2])


def pre_logits(images: list[Image.Image]) -> np.ndarray:
    spec = describe_backbone("tf_efficientnet_lite0", "auto")
    transform = build_eval_transform(resolve_data_config(spec.pretrained_cfg))
    extractor = FeatureMapExtractor(spec.create()[0], [lv for lv in spec.levels if lv.name == "pre_logits"]).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 32):
            x = torch.stack([transform(im.convert("RGB")) for im in images[i : i + 32]])
            out.append(extractor(x)["pre_logits"].flatten(1))
    return torch.nn.functional.normalize(torch.cat(out), dim=1).numpy()


def main() -> None:
    root, n = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 40
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    classes = np.array([p.parent.name for p in files])
    encoded = [p.read_bytes() for p in files]
    originals = [Image.open(io.BytesIO(data)) for data in encoded]
    pick = np.random.default_rng(0).choice(len(files), min(n, len(files)), replace=False)
    copies = [near_copy(originals[i]) for i in pick]
    same = (classes[:, None] == classes[None, :]) & ~np.eye(len(files), dtype=bool)
    for name, embed in (("pre-logits cosine", pre_logits), ("thumbnail correlation", None)):
        if embed is None:
            a, b = thumbnails(encoded), thumbnails(copies)
        else:
            a, b = embed(originals), embed([Image.open(io.BytesIO(data)) for data in copies])
        pairs = np.einsum("ij,ij->i", a[pick], b)
        print(
            f"{root.name}, {name}: copies min {pairs.min():.4f} (median {np.median(pairs):.4f}); distinct same-class "
            f"max {(a @ a.T)[same].max():.4f}"
        )


if __name__ == "__main__":
    main()
