"""Fitting a linear probe directly (full batch, no Lightning): a starting point for LP-FT, never a reported result."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmtransfer.heads.heads import LinearProbeHead


def fit_probe_in_place(
    head: LinearProbeHead, features: dict[str, torch.Tensor], labels: torch.Tensor, steps: int = 100, lr: float = 0.01
) -> float:
    """Fit ``head`` (normaliser first, then its linear layer) on training features only; returns the final loss.

    Used to start fine-tuning from a trained linear probe (LP-FT: it keeps the pretrained features from being
    distorted by a random head in the first steps). Only training data is touched.
    """
    head.normalizer.fit(features)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    head.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels)
        loss.backward()
        optimizer.step()
    return float(loss)
