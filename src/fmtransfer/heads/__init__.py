"""Heads stage: small classifiers trained on cached (pooled) feature maps."""

from fmtransfer.heads.data import PooledFeatureDataset, feature_loader, pooled_level
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
    "FeatureNormalizer",
    "HeadClassifier",
    "LinearProbeHead",
    "MLPHead",
    "MultiLayerHead",
    "PooledFeatureDataset",
    "build_head",
    "feature_loader",
    "pooled_level",
]
