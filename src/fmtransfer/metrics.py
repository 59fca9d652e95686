"""Classification metrics reported everywhere: accuracy, macro-F1 and balanced accuracy (torchmetrics)."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassRecall

METRIC_NAMES = ("acc", "f1_macro", "balanced_acc")


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """The three metrics, keys ``{prefix}acc``, ``{prefix}f1_macro``, ``{prefix}balanced_acc``."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
            # Balanced accuracy is the mean per-class recall.
            "balanced_acc": MulticlassRecall(num_classes, average="macro"),
        },
        prefix=prefix,
    )
