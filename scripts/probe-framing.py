"""How a fitted linear probe scores its own training images once they are framed differently (the embedded digits).

    python scripts/probe-framing.py [--size 160]

LP-FT's probe (``fit_regularised_probe``) is fitted on the cached pre-logits of the training images as evaluation
frames them (resize to size/crop_pct, centre crop); fine-tuning then trains on those images through the training
transform, which frames them otherwise even with augmentation off (the whole image resized). Prints the probe's
cross-entropy on the training and validation images (the digits' 216-image stratified hold-out) under evaluation
framing, the whole image resized bicubically (timm's interpolation for lite0) and bilinearly. Offline: scikit-learn's
digits and the packaged lite0 weights. docs/finetune-recipe.md section 12 reads it.
"""

from __future__ import annotations

import argparse

import numpy as np
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fmtransfer.backbone.weights import load_weights, resolve_weights_source
from fmtransfer.heads.fit import fit_regularised_probe
from fmtransfer.heads.heads import LinearProbeHead

NAME = "tf_efficientnet_lite0"


def pre_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    cfg = model.pretrained_cfg
    images = (images - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    with torch.no_grad():
        return torch.cat([model.forward_head(model.forward_features(b), pre_logits=True) for b in images.split(256)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160)
    size = parser.parse_args().size
    digits = load_digits()
    pixels = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
    labels = torch.tensor(digits.target)
    model = timm.create_model(NAME)
    load_weights(model, NAME, resolve_weights_source(NAME))
    model.eval()
    resized = F.interpolate(pixels, size=int(size / model.pretrained_cfg["crop_pct"]), mode="bicubic")
    off = (resized.shape[-1] - size) // 2
    framings = {
        "evaluation (resize, centre crop)": pre_logits(model, resized[..., off : off + size, off : off + size]),
        "whole image, bicubic": pre_logits(model, F.interpolate(pixels, size=size, mode="bicubic")),
        "whole image, bilinear": pre_logits(model, F.interpolate(pixels, size=size, mode="bilinear")),
    }
    train, val = train_test_split(np.arange(len(labels)), test_size=216, stratify=digits.target, random_state=0)
    head = LinearProbeHead({"pre_logits": model.num_features}, 10)
    first = next(iter(framings.values()))
    fit_regularised_probe(head, {"pre_logits": first[train]}, labels[train], seed=0)
    print(f"| framing, {size} px | loss on the probe's training images | loss on held-out images |\n|---|---|---|")
    for name, features in framings.items():
        with torch.no_grad():
            losses = [F.cross_entropy(head({"pre_logits": features[i]}), labels[i]).item() for i in (train, val)]
        print(f"| {name} | {losses[0]:.3f} | {losses[1]:.3f} |")


if __name__ == "__main__":
    main()
