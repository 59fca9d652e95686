"""``logger=csv|tensorboard|mlflow|wandb``: each writes into the run dir, offline, alongside the CSV log."""

from __future__ import annotations

import pytest

from fmtransfer.cli.config import compose_config
from fmtransfer.regimes import run_regime


def _run(tmp_path, tiny_overrides, logger: str):
    run_dir = tmp_path / logger
    run_regime(compose_config([*tiny_overrides, f"logger={logger}", "head=linear"]), run_dir)
    assert (run_dir / "csv" / "metrics.csv").is_file(), "every logger choice keeps the CSV log"
    return run_dir


def test_tensorboard_writes_event_files_into_the_run_dir(tmp_path, tiny_overrides):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _run(tmp_path, tiny_overrides, "tensorboard")
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no event file in the run dir"
    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    assert {"train/loss", "val/loss", "test/acc"} <= set(accumulator.Tags()["scalars"])


def test_mlflow_writes_a_file_store_into_the_run_dir(tmp_path, tiny_overrides, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the logger must allow it itself
    run_dir = _run(tmp_path, tiny_overrides, "mlflow")
    store = run_dir / "mlruns"
    experiments = [p for p in store.iterdir() if (p / "meta.yaml").is_file() and p.name != "0"]
    assert len(experiments) == 1 and "name: fmtransfer" in (experiments[0] / "meta.yaml").read_text()
    runs = [p for p in experiments[0].iterdir() if (p / "meta.yaml").is_file()]
    assert len(runs) == 1
    metrics = runs[0] / "metrics"  # MLflow stores "val/loss" as metrics/val/loss
    assert {"train/loss", "val/loss", "test/acc"} <= {
        str(p.relative_to(metrics)) for p in metrics.rglob("*") if p.is_file()
    }


def test_wandb_runs_offline_into_the_run_dir(tmp_path, tiny_overrides, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = _run(tmp_path, tiny_overrides, "wandb")
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), "no offline run file to sync later"
