"""Logger constructors that need one more step than Lightning's own (the others are instantiated from
``configs/logger/`` directly)."""

from __future__ import annotations

import os

from pytorch_lightning.loggers import MLFlowLogger


def mlflow_logger(tracking_uri: str, experiment_name: str, run_name: str | None = None) -> MLFlowLogger:
    """Lightning's MLFlowLogger; a ``file:`` store works offline. MLflow 3 keeps its file store in maintenance
    mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is set: a local run dir is exactly what we want, so allow
    it (an explicit setting in the environment wins)."""
    if tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(experiment_name=experiment_name, tracking_uri=tracking_uri, run_name=run_name)
