"""Representation similarity: linear CKA between levels, or between a frozen and a fine-tuned backbone."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


def linear_cka(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Linear centred kernel alignment of two representations of the same N inputs (Kornblith et al., 2019).

    1 for representations equal up to rotation and isotropic scaling; invariant to the feature dimension.
    """
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64).reshape(len(x), -1)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64).reshape(len(y), -1)
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if norm > 0 else 0.0


def cka_matrix(features: Mapping[str, np.ndarray | torch.Tensor]) -> tuple[list[str], np.ndarray]:
    """Pairwise linear CKA between levels (pooled features ``[N, C]`` each)."""
    names = list(features)
    m = np.eye(len(names))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            m[i, j] = m[j, i] = linear_cka(features[a], features[names[j]])
    return names, m


def cka_between(frozen: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per-level CKA between the same level of two backbones on the same images (1: the level did not change)."""
    return {name: linear_cka(frozen[name], tuned[name]) for name in frozen if name in tuned}
