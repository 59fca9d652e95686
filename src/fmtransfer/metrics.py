"""Classification metrics reported everywhere: accuracy, macro-F1 and balanced accuracy (torchmetrics)."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

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


def per_class_metrics(num_classes: int) -> MetricCollection:
    """Precision, recall and F1 of every class (``average=None``: one value per class, in class-index order)."""
    return MetricCollection(
        {
            "precision": MulticlassPrecision(num_classes, average=None),
            "recall": MulticlassRecall(num_classes, average=None),
            "f1": MulticlassF1Score(num_classes, average=None),
        }
    )


def per_class_table(values: dict, class_names: list[str]) -> dict:
    """``{class name: {"precision", "recall", "f1", "support"}}`` from per-class lists: ``per_class_metrics`` values
    and ``support``, the number of test images of each class."""
    return {
        name: {
            **{k: round(float(values[k][i]), 6) for k in ("precision", "recall", "f1")},
            "support": int(values["support"][i]),
        }
        for i, name in enumerate(class_names)
    }
