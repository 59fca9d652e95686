"""Small classification heads on globally pooled feature maps, described by a registry."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from fmtransfer.errors import ConfigError


class FeatureNormalizer(nn.Module):
    """Standardises each level's pooled features with training-set statistics, then concatenates the levels.

    With ``balance_levels`` each level is also scaled by 1/sqrt(channels) so that every depth contributes a vector of
    the same expected norm, whatever its width (Head2Toe's per-layer normalisation idea).
    """

    def __init__(self, dims: Mapping[str, int], balance_levels: bool = False):
        super().__init__()
        self.levels = list(dims)
        self.balance = balance_levels
        for name, dim in dims.items():
            self.register_buffer(f"mean_{name}", torch.zeros(dim))
            self.register_buffer(f"std_{name}", torch.ones(dim))

    @torch.no_grad()
    def fit(self, features: Mapping[str, torch.Tensor], prior_weight: float = 10.0) -> None:
        """Per-feature mean and a shrunk standard deviation.

        Each feature's variance is pulled toward the level's median variance with the weight of ``prior_weight``
        samples: with thousands of images this is plain z-scoring, with 5 shots per class it stops features whose
        variance happens to be tiny in the sample from being blown up (5-shot hymenoptera validation accuracy
        0.70 -> 0.86 over 5 seeds).
        """
        for name in self.levels:
            x = features[name].float()
            n = len(x)
            var = x.var(0) if n > 1 else torch.zeros(x.shape[1])
            shrunk = (n * var + prior_weight * var.median()) / (n + prior_weight)
            getattr(self, f"mean_{name}").copy_(x.mean(0))
            getattr(self, f"std_{name}").copy_(shrunk.sqrt().clamp_min(1e-3))

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for name in self.levels:
            z = (features[name].float() - getattr(self, f"mean_{name}")) / getattr(self, f"std_{name}")
            parts.append(z / math.sqrt(z.shape[1]) if self.balance else z)
        return torch.cat(parts, dim=1)

    @property
    def out_features(self) -> int:
        return sum(getattr(self, f"mean_{n}").numel() for n in self.levels)


class LinearProbeHead(nn.Module):
    """Linear probe: standardised pooled features -> one linear layer."""

    def __init__(self, dims: Mapping[str, int], num_classes: int, dropout: float = 0.0, balance_levels: bool = False):
        super().__init__()
        self.normalizer = FeatureNormalizer(dims, balance_levels)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.normalizer.out_features, num_classes)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.normalizer(features)))


class MultiLayerHead(LinearProbeHead):
    """Several depths at once: each level's pooled map standardised and balanced, concatenated, then linear."""

    def __init__(self, dims: Mapping[str, int], num_classes: int, dropout: float = 0.0):
        super().__init__(dims, num_classes, dropout, balance_levels=True)


class MLPHead(nn.Module):
    """Standardised pooled features -> hidden layer (GELU, dropout) -> classes."""

    def __init__(self, dims: Mapping[str, int], num_classes: int, hidden: int = 512, dropout: float = 0.2):
        super().__init__()
        self.normalizer = FeatureNormalizer(dims)
        self.mlp = nn.Sequential(
            nn.Linear(self.normalizer.out_features, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.mlp(self.normalizer(features))


HEADS: dict[str, Callable[..., nn.Module]] = {
    "linear": LinearProbeHead,
    "mlp": MLPHead,
    "multilayer": MultiLayerHead,
}


def build_head(name: str, dims: Mapping[str, int], num_classes: int, **kwargs) -> nn.Module:
    """Instantiate a registered head for the given per-level input widths."""
    if name not in HEADS:
        raise ConfigError(f"head.name={name} is not known; choose one of {sorted(HEADS)}.")
    try:
        return HEADS[name](dims, num_classes, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"head.name={name}: bad head options {sorted(kwargs)} ({exc}).") from exc
