"""Heads: inputs standardised with training statistics, per-level balancing, registry errors."""

from __future__ import annotations

import pytest
import torch

from fmtransfer.errors import ConfigError
from fmtransfer.heads import HEADS, FeatureNormalizer, build_head


def test_normalizer_standardises_with_training_statistics():
    torch.manual_seed(0)
    feats = {"a": torch.randn(500, 4) * 10 + 3, "b": torch.randn(500, 100) * 0.1}
    norm = FeatureNormalizer({"a": 4, "b": 100})
    norm.fit(feats)
    z = norm(feats)
    assert z.shape == (500, 104)
    assert torch.allclose(z.mean(0), torch.zeros(104), atol=1e-4)
    # 500 samples: the shrinkage toward the median variance is negligible for same-scale features.
    assert torch.allclose(z[:, 4:].std(0), torch.ones(100), atol=0.05)
    assert torch.allclose(z[:, :4].std(0), torch.ones(4), atol=0.05)


def test_few_shot_standardisation_does_not_blow_up_tiny_variance_features():
    torch.manual_seed(0)
    x = torch.randn(10, 50)
    x[:, 0] *= 1e-4  # a feature that happens to barely vary in a 10-image sample
    norm = FeatureNormalizer({"f": 50})
    norm.fit({"f": x})
    z = norm({"f": torch.randn(100, 50)})
    assert z[:, 0].abs().max() < 10, "unseen data must not be scaled by 1/std of a near-constant sample"


def test_balanced_levels_contribute_equal_norms_whatever_their_width():
    torch.manual_seed(0)
    feats = {"narrow": torch.randn(800, 16), "wide": torch.randn(800, 1024)}
    norm = FeatureNormalizer({"narrow": 16, "wide": 1024}, balance_levels=True)
    norm.fit(feats)
    z = norm(feats)
    narrow, wide = z[:, :16].norm(dim=1).mean(), z[:, 16:].norm(dim=1).mean()
    assert abs(narrow - wide) / wide < 0.1


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_registered_head_maps_levels_to_logits(name):
    head = build_head(name, {"level3": 112, "pre_logits": 1280}, num_classes=7)
    out = head({"level3": torch.randn(5, 112), "pre_logits": torch.randn(5, 1280)})
    assert out.shape == (5, 7)


def test_unknown_head_and_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"head\.name=nope"):
        build_head("nope", {"x": 3}, 2)
    with pytest.raises(ConfigError, match="bad head options"):
        build_head("linear", {"x": 3}, 2, hidden=5)


def test_grid_pooling_is_adaptive_average_pooling_and_skips_grids_finer_than_the_map():
    import torch.nn.functional as F

    from fmtransfer.heads import grid_features, grid_pool

    x = torch.randn(2, 3, 7, 5)
    for grid in (1, 2, 3, 5):
        assert torch.allclose(grid_pool(x, grid), F.adaptive_avg_pool2d(x, grid).flatten(1), atol=1e-6), grid
    out = grid_features({"level3": x, "level4": torch.randn(2, 4, 1, 1), "pre_logits": torch.randn(2, 6)}, [1, 2])
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "level3": (2, 3),
        "level3@2x2": (2, 12),
        "level4": (2, 4),  # a 1x1 map has no 2x2 grid
        "pre_logits": (2, 6),  # a vector has no grid
    }


def _signal_in_one_level(n: int = 300, seed: int = 0):
    """Three levels of standard normal features; only ``mid``'s first 8 features shift with the class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    feats = {name: torch.randn(n, dim, generator=g) for name, dim in (("low", 40), ("mid", 8), ("high", 72))}
    feats["mid"] += torch.nn.functional.one_hot(labels, 4).repeat(1, 2).float()
    return feats, labels


def test_selective_head_keeps_exactly_its_fraction_and_reads_only_those_features():
    feats, labels = _signal_in_one_level()
    head = build_head("selective", {k: v.shape[1] for k, v in feats.items()}, 4, fraction=0.25)
    head.normalizer.fit(feats)
    head.select(feats, labels)
    assert head.kept.numel() == 30 == head.classifier.in_features  # round(0.25 * 120)
    assert head.kept.unique().numel() == 30
    kept = set(head.kept.tolist())
    dropped = [i for i in range(120) if i not in kept]
    x = {k: v[:10].clone() for k, v in feats.items()}
    before = head(x)
    flat = torch.cat(list(x.values()), dim=1)
    flat[:, dropped] += 100.0  # what the head did not keep cannot change its logits
    split = dict(zip(x, flat.split([40, 8, 72], dim=1), strict=True))
    assert torch.equal(head(split), before)
    flat[:, sorted(kept)[0]] += 100.0
    assert not torch.allclose(head(dict(zip(x, flat.split([40, 8, 72], dim=1), strict=True))), before)


def test_selection_keeps_the_level_that_carries_the_signal():
    feats, labels = _signal_in_one_level()
    head = build_head("selective", {k: v.shape[1] for k, v in feats.items()}, 4, fraction=8 / 120)
    head.normalizer.fit(feats)
    head.select(feats, labels)
    assert head.kept_groups() == {"mid": {"features": 8, "of": 8, "cells": [8]}}


def test_group_lasso_fit_meets_its_optimality_conditions():
    """KKT of ``mean CE + lam * sum_j ||W_j||``: a kept feature's gradient is ``-lam W_j / ||W_j||``, a zeroed
    feature's gradient norm is at most ``lam``; the bias's gradient is 0."""
    import torch.nn.functional as F

    from fmtransfer.heads.selection import group_lasso_logistic, lambda_max

    feats, labels = _signal_in_one_level(n=200, seed=1)
    x = torch.cat(list(feats.values()), dim=1).double()
    lam = 0.2 * lambda_max(x, labels, 4)
    weight, bias = group_lasso_logistic(x, labels, 4, lam, iterations=3000)
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    F.cross_entropy(x @ w.T + b, labels).backward()
    norms = weight.norm(dim=0)
    on = norms > 0
    assert 0 < on.sum() < x.shape[1]
    assert torch.allclose(w.grad[:, on], -lam * weight[:, on] / norms[on], atol=1e-4)
    assert (w.grad[:, ~on].norm(dim=0) <= lam * (1 + 1e-6)).all()
    assert b.grad.abs().max() < 1e-6
