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
