"""Feature selection as Head2Toe does it (Evci et al., ICML 2022): a linear classifier fitted with a group-lasso
penalty whose groups are the features (each feature's weights over the classes), then the features ranked by the
norm of their weights.

The penalised fit is multinomial logistic regression solved by FISTA (accelerated proximal gradient) with the
step set by the loss's Lipschitz bound: no learning rate to tune, exact zeros, the same answer for the same data.
The penalty is given as a fraction of ``lambda_max``, the smallest penalty that zeroes every feature, so one setting
means the same sparsity pressure on any dataset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lipschitz_bound(x: torch.Tensor, iterations: int = 50) -> float:
    """An upper bound on the Lipschitz constant of the mean softmax cross-entropy's gradient in ``(W, b)``:
    ``(sigma_max(x)^2 + n) / (2 n)`` (Böhning's bound), sigma_max by power iteration (with 5 % margin)."""
    n = len(x)
    v = torch.ones(x.shape[1], dtype=x.dtype) / x.shape[1] ** 0.5
    for _ in range(iterations):
        v = x.T @ (x @ v)
        v = v / v.norm().clamp_min(1e-12)
    sigma2 = float((x @ v).norm() ** 2)
    return 1.05 * (sigma2 + n) / (2 * n)


def _gradients(x, onehot, weight, bias):
    probs = torch.softmax(x @ weight.T + bias, dim=1)
    residual = (probs - onehot) / len(x)
    return residual.T @ x, residual.sum(0)


def lambda_max(x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """The smallest group-lasso penalty at which every feature's weights are zero (bias at the class log-priors)."""
    onehot = F.one_hot(labels, num_classes).to(x.dtype)
    prior = onehot.mean(0).clamp_min(1e-12)
    grad_w, _ = _gradients(x, onehot, torch.zeros(num_classes, x.shape[1], dtype=x.dtype), prior.log())
    return float(grad_w.norm(dim=0).max())


def group_lasso_logistic(
    x: torch.Tensor, labels: torch.Tensor, num_classes: int, penalty: float, iterations: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """``argmin_{W, b} mean CE(x W^T + b) + penalty * sum_j ||W[:, j]||_2`` by FISTA; returns ``(W, b)``."""
    onehot = F.one_hot(labels, num_classes).to(x.dtype)
    step = 1.0 / lipschitz_bound(x)
    weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype)
    bias = onehot.mean(0).clamp_min(1e-12).log()
    y_w, y_b, t = weight.clone(), bias.clone(), 1.0
    for _ in range(iterations):
        grad_w, grad_b = _gradients(x, onehot, y_w, y_b)
        new_w = _shrink(y_w - step * grad_w, step * penalty)
        new_b = y_b - step * grad_b
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y_w = new_w + (t - 1) / t_next * (new_w - weight)
        y_b = new_b + (t - 1) / t_next * (new_b - bias)
        weight, bias, t = new_w, new_b, t_next
    return weight, bias


def _shrink(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """The group-lasso proximal step: each feature's weights shrunk toward 0 by ``threshold`` in norm."""
    norms = weight.norm(dim=0, keepdim=True)
    return weight * (1 - threshold / norms.clamp_min(1e-30)).clamp_min(0)


def rank_features(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Feature indices, most useful first: features with weights by the norm of their weights, then the zeroed ones
    by the norm of their loss gradient (at the optimum at most the penalty: the closest to entering first)."""
    norms = weight.norm(dim=0)
    grad_w, _ = _gradients(x, F.one_hot(labels, weight.shape[0]).to(x.dtype), weight, bias)
    grad_norms = grad_w.norm(dim=0)
    # A zeroed feature's key is below every kept one's (norms > 0 map to > 1): one sort, ties to the lower index.
    key = torch.where(
        norms > 0, 1 + norms / norms.max().clamp_min(1e-30), grad_norms / grad_norms.max().clamp_min(1e-30)
    )
    return torch.sort(-key, stable=True).indices


def kept_count(num_features: int, fraction: float) -> int:
    """How many of ``num_features`` a fraction keeps: ``round(fraction * num_features)``, at least 1."""
    return max(1, min(num_features, round(fraction * num_features)))


def select_features(
    x: torch.Tensor, labels: torch.Tensor, num_classes: int, fraction: float, penalty: float, iterations: int = 300
) -> torch.Tensor:
    """The indices (ascending) of the ``kept_count`` best features of ``x`` under a group-lasso fit at ``penalty``
    (a fraction of ``lambda_max``), in float32 (on digits' 2,560 features it keeps the same ones as float64)."""
    x = x.float()
    weight, bias = group_lasso_logistic(
        x, labels, num_classes, penalty * lambda_max(x, labels, num_classes), iterations
    )
    order = rank_features(x, labels, weight, bias)
    return order[: kept_count(x.shape[1], fraction)].sort().values
