"""Where a trained classifier looks: Grad-CAM on a chosen level, and occlusion sensitivity."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def grad_cam(
    level_map: Callable[[torch.Tensor], torch.Tensor],
    classify: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    target: int,
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) at the level ``level_map`` returns; ``[H, W]`` in [0, 1] at input size.

    ``level_map`` maps a ``[1, 3, H, W]`` image to the level's ``[1, C, h, w]`` map; ``classify`` maps that map to
    logits (the rest of the network and the head).
    """
    fmap = level_map(image).detach().requires_grad_(True)
    score = classify(fmap)[0, target]
    (grad,) = torch.autograd.grad(score, fmap)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * fmap).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return (cam / cam.max()).detach() if cam.max() > 0 else cam.detach()


@torch.no_grad()
def occlusion_sensitivity(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    target: int,
    patch: int,
    stride: int,
    fill: float = 0.0,
) -> torch.Tensor:
    """Drop of the true class's probability when a grey ``patch`` (``fill``: grey in normalised units) covers each
    position; ``[rows, cols]``, larger = more important."""
    base = predict(image).softmax(1)[0, target]
    _, _, h, w = image.shape
    rows = range(0, max(h - patch, 0) + 1, stride)
    cols = range(0, max(w - patch, 0) + 1, stride)
    batch = []
    for r in rows:
        for c in cols:
            x = image.clone()
            x[:, :, r : r + patch, c : c + patch] = fill
            batch.append(x)
    probs = torch.cat([predict(b).softmax(1)[:, target] for b in torch.cat(batch).split(64)])
    return (base - probs).reshape(len(rows), len(cols))
