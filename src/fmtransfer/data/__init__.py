"""Data stage: load labelled images (``sources``), split them (``splits``), present them as tensors (``images``)."""

from fmtransfer.data.images import ImageClassificationDataset, split_fingerprint, to_rgb
from fmtransfer.data.prepare import CrossValidation, PreparedData, is_selection_run, prepare_data
from fmtransfer.data.sources import DATA_SOURCES, load_image_dataset
from fmtransfer.data.splits import make_splits, select_shots

__all__ = [
    "DATA_SOURCES",
    "CrossValidation",
    "ImageClassificationDataset",
    "PreparedData",
    "is_selection_run",
    "load_image_dataset",
    "make_splits",
    "prepare_data",
    "select_shots",
    "split_fingerprint",
    "to_rgb",
]
