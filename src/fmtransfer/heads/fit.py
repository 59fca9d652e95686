"""Fitting a linear probe directly (full batch, no Lightning): a starting point for LP-FT, never a reported result."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from fmtransfer.heads.heads import LinearProbeHead

Features = dict[str, torch.Tensor]


def fit_probe_in_place(
    head: LinearProbeHead,
    features: Features,
    labels: torch.Tensor,
    validation: tuple[Features, torch.Tensor] | None = None,
    steps: int = 300,
    lr: float = 0.001,
    weight_decay: float = 1e-4,
    check_every: int = 10,
) -> float:
    """Fit ``head`` (normaliser first, then its linear layer) full-batch on training features.

    With ``validation``, the weights of the step with the lowest validation loss are kept (selection on validation
    only; the test split is never seen). Returns that validation loss, or the final training loss without one.
    Used to start fine-tuning from a good linear probe (LP-FT), so that a random head does not distort the
    pretrained features in the first steps.
    """
    head.normalizer.fit(features)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    best_loss, best_state = float("inf"), None
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        head.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels)
        loss.backward()
        optimizer.step()
        if validation is not None and step % check_every == 0:
            head.eval()
            with torch.no_grad():
                val_loss = float(F.cross_entropy(head(validation[0]), validation[1]))
            if val_loss < best_loss:
                best_loss, best_state = val_loss, copy.deepcopy(head.state_dict())
    if best_state is not None:
        head.load_state_dict(best_state)
        return best_loss
    return float(loss.detach())
