"""Extraction and training under Lightning DDP: 2 CPU processes (gloo), the real ``make train`` entry point."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import run_train_cli


def _entries(cache_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(cache_dir.glob("*/*")) if (p / "manifest.json").is_file()}


@pytest.mark.skipif(sys.platform != "linux", reason="the DDP test launches gloo processes on Linux")
def test_two_process_extraction_writes_the_single_process_cache(tmp_path):
    # Digits at 32 px, small splits (50 / 85 / 90 images): an odd-sized split is what a distributed sampler pads.
    common = [
        "data.image_size=32",
        "data.shots_per_class=5",
        "data.val_fraction=0.05",
        "data.test_fraction=0.05",
        "head.epochs=2",
        "head.min_steps=0",
        "trainer.progress_bar=false",
    ]
    single = run_train_cli([*common, f"paths.data_dir={tmp_path / 'one'}", f"hydra.run.dir={tmp_path / 'run1'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_train_cli(
        [
            *common,
            "trainer.devices=2",
            f"paths.data_dir={tmp_path / 'two'}",
            f"hydra.run.dir={tmp_path / 'run2'}",
        ]
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "with 2 processes" in ddp.stdout
    assert ddp.stdout.strip().splitlines()[-1] == f"run dir: {tmp_path / 'run2'}"

    one, two = _entries(tmp_path / "one" / "cache"), _entries(tmp_path / "two" / "cache")
    assert set(one) == set(two) and len(one) == 3  # same fingerprints: train, validation, test
    for name, path in one.items():
        m1 = json.loads((path / "manifest.json").read_text())
        m2 = json.loads((two[name] / "manifest.json").read_text())
        assert m1["parts"] == m2["parts"]
        assert "distributed" not in m1
        dist = m2["distributed"]
        assert dist["world_size"] == 2 and dist["duplicate_rows"] == 0
        assert sum(s["rows"] for s in dist["shards"]) == m1["num_samples"]
        for record in (m1["labels"], *m1["levels"].values()):
            a = np.load(path / record["file"])
            b = np.load(two[name] / record["file"])
            assert a.shape == b.shape and np.array_equal(a, b), f"{name}/{record['file']} differs"
    assert not list((tmp_path / "two" / "cache").glob("*/.partial-*")), "shards left behind"

    # Training ran under DDP too; test metrics count every test image exactly once (no padded repeats).
    metrics = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert any(n % 2 for n in metrics["split_sizes"].values()), metrics["split_sizes"]
    assert sum(map(sum, metrics["test_confusion"])) == metrics["split_sizes"]["test"]
    assert metrics["test"]["acc"] > 0.5
