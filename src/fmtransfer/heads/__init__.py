"""Heads stage: small classifiers trained on cached (pooled) feature maps."""

from fmtransfer.heads.data import (
    AugmentedViewsDataset,
    CachedMapDataset,
    InMemoryDataset,
    PooledFeatureDataset,
    ResidentBatches,
    feature_loader,
    pooled_level,
)
from fmtransfer.heads.fit import fit_probe_in_place, fit_regularised_probe
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
    "AugmentedViewsDataset",
    "CachedMapDataset",
    "FeatureNormalizer",
    "HeadClassifier",
    "InMemoryDataset",
    "LinearProbeHead",
    "MLPHead",
    "MultiLayerHead",
    "PooledFeatureDataset",
    "ResidentBatches",
    "build_head",
    "feature_loader",
    "fit_probe_in_place",
    "fit_regularised_probe",
    "pooled_level",
]
