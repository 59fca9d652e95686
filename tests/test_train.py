"""End to end: config -> data -> cached maps -> head -> metrics.json, through the real CLI too."""

from __future__ import annotations

import json

import pytest

from fmtransfer.cli.common import user_errors
from fmtransfer.cli.config import compose_config
from fmtransfer.regimes import run_regime

from .conftest import run_train_cli


def test_frozen_run_writes_metrics_and_reuses_its_cache(tmp_path, tiny_overrides):
    cfg = compose_config(tiny_overrides)
    first = run_regime(cfg, tmp_path / "run1")
    assert first["cache"]["hit"] is False and first["cache"]["extract_seconds"] > 0
    for split in ("val", "test"):
        metrics = {k: v for k, v in first[split].items() if k != "per_class"}
        assert set(metrics) == {"acc", "f1_macro", "balanced_acc"}
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    per_class = first["test"]["per_class"]  # test only: {class: precision, recall, f1, support}
    assert sum(c["support"] for c in per_class.values()) == first["split_sizes"]["test"]
    assert all(0.0 <= c[k] <= 1.0 for c in per_class.values() for k in ("precision", "recall", "f1"))
    assert first["test"]["acc"] > 0.5, "10 shots of real digits with ImageNet features beat chance (0.1) by far"
    assert first["split_source"]["test"].startswith("made from train")
    assert "10 shots per class" in first["split_source"]["train"]
    assert first["split_sizes"]["train"] == 100
    run1 = tmp_path / "run1"
    assert json.loads((run1 / "metrics.json").read_text()) == first
    assert (run1 / "config.yaml").is_file() and (run1 / "checkpoints" / "best.ckpt").is_file()
    assert (run1 / "csv" / "metrics.csv").is_file()

    second = run_regime(cfg, tmp_path / "run2")
    assert second["cache"]["hit"] is True and second["cache"]["extract_seconds"] == 0
    assert second["cache"]["dir"] == first["cache"]["dir"]
    # Same config and seed on the CPU: identical numbers.
    assert second["test"] == first["test"] and second["val"] == first["val"]


def test_switching_heads_reuses_the_cache(tmp_path, tiny_overrides):
    run_regime(compose_config([*tiny_overrides, "head=multilayer"]), tmp_path / "a")
    for head in ("linear", "mlp"):
        metrics = run_regime(compose_config([*tiny_overrides, f"head={head}"]), tmp_path / head)
        assert metrics["cache"]["hit"] is True
        assert metrics["head"]["name"] == head and metrics["head"]["levels"] == ["pre_logits"]


def test_cli_prints_the_run_dir_last(tmp_path, tiny_overrides):
    proc = run_train_cli([*tiny_overrides, f"hydra.run.dir={tmp_path / 'cli-run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"run dir: {tmp_path / 'cli-run'}"
    # the entry point's own log lines (python -m runs it as __main__) go through fmtransfer's logging too
    assert f"[cli] resume an interrupted run with: make train ARGS=resume={tmp_path / 'cli-run'}" in proc.stdout
    metrics = json.loads((tmp_path / "cli-run" / "metrics.json").read_text())
    assert metrics["regime"] == "frozen"


def test_cli_bad_input_is_one_clear_line_not_a_traceback(tmp_path, tiny_overrides):
    proc = run_train_cli([*tiny_overrides, "data.path=/no/such/folder", f"hydra.run.dir={tmp_path / 'bad'}"])
    assert proc.returncode == 2
    assert "data.path=/no/such/folder: no such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr


# The CLI turns these errors into that line and status 2 (above); in-process here, a fresh interpreter per case costs
# ~13 s of imports on 2 cores.
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["cache.levels=[level9]"], "feature level 'level9' is not known"),
        (["backbone.name=tf_efficientnet_lite"], "Did you mean"),
        (["data.shots_per_class=1000"], "data.shots_per_class=1000"),
        # The grids Head2Toe's head reads cannot come from a cache of globally pooled vectors: no re-extraction.
        (["head=selective", "cache.pool=global"], "cache.pool=global keeps one vector per level: set cache.pool=avg"),
    ],
)
def test_bad_input_names_the_option_and_exits_2(tmp_path, tiny_overrides, capsys, overrides, message):
    with pytest.raises(SystemExit) as stop, user_errors():
        run_regime(compose_config([*tiny_overrides, *overrides]), tmp_path / "bad")
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
