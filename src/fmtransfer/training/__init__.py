"""Training stage: the fit -> select on validation -> test-once loop and what plugs into Lightning around it.

``fit.py`` the loop; ``datamodules.py`` images and cached features as LightningDataModules; ``callbacks.py`` epoch
timing, peak memory and Auto-RGN's learning rates; ``placement.py`` where tensors live; ``instantiate.py`` Trainer,
callbacks and loggers built from config (the only module here that reads a config).
"""

from fmtransfer.training.callbacks import EpochTimer, PeakMemory, RelativeGradNormLR
from fmtransfer.training.datamodules import CachedFeatureDataModule, ImageDataModule
from fmtransfer.training.fit import epochs_for, fit_select_test, reseed, validation_interval
from fmtransfer.training.instantiate import TrainingTools, instantiate_training
from fmtransfer.training.placement import (
    InPrecision,
    Placement,
    Precision,
    cpu_has_native_bf16,
    feature_batches,
    in_precision,
    resolve_placement,
    resolve_precision,
)

__all__ = [
    "CachedFeatureDataModule",
    "EpochTimer",
    "ImageDataModule",
    "InPrecision",
    "PeakMemory",
    "Placement",
    "Precision",
    "RelativeGradNormLR",
    "TrainingTools",
    "cpu_has_native_bf16",
    "epochs_for",
    "feature_batches",
    "fit_select_test",
    "in_precision",
    "instantiate_training",
    "reseed",
    "resolve_placement",
    "resolve_precision",
    "validation_interval",
]
