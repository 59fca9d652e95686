"""Heads stage: small classifiers trained on cached (pooled) feature maps."""

from fmtransfer.heads.data import (
    AugmentedViewsDataset,
    CachedMapDataset,
    InMemoryDataset,
    PooledFeatureDataset,
    PooledFeatureStream,
    ResidentBatches,
    feature_loader,
    pooled_level,
)
from fmtransfer.heads.fit import fit_probe_in_place, fit_regularised_probe
from fmtransfer.heads.grids import GridPooling, grid_features, grid_pool
from fmtransfer.heads.heads import (
    HEADS,
    FeatureNormalizer,
    LinearProbeHead,
    MLPHead,
    MultiLayerHead,
    SelectiveHead,
    build_head,
    input_grids,
)
from fmtransfer.heads.module import HeadClassifier

__all__ = [
    "HEADS",
    "AugmentedViewsDataset",
    "CachedMapDataset",
    "FeatureNormalizer",
    "GridPooling",
    "HeadClassifier",
    "InMemoryDataset",
    "LinearProbeHead",
    "MLPHead",
    "MultiLayerHead",
    "PooledFeatureDataset",
    "PooledFeatureStream",
    "ResidentBatches",
    "SelectiveHead",
    "build_head",
    "feature_loader",
    "fit_probe_in_place",
    "fit_regularised_probe",
    "grid_features",
    "grid_pool",
    "input_grids",
    "pooled_level",
]
