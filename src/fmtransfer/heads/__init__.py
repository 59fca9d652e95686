"""Heads stage: small classifiers trained on cached (pooled) feature maps."""

from fmtransfer.heads.data import CachedMapDataset, PooledFeatureDataset, feature_loader, pooled_level
from fmtransfer.heads.fit import fit_probe_in_place
from fmtransfer.heads.heads import (
    HEADS,
    FeatureNormalizer,
    LinearProbeHead,
    MLPHead,
    MultiLayerHead,
    build_head,
)
from fmtransfer.heads.module import HeadClassifier

__all__ = [
    "HEADS",
    "CachedMapDataset",
    "FeatureNormalizer",
    "HeadClassifier",
    "LinearProbeHead",
    "MLPHead",
    "MultiLayerHead",
    "PooledFeatureDataset",
    "build_head",
    "feature_loader",
    "fit_probe_in_place",
    "pooled_level",
]
