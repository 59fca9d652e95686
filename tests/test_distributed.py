"""Extraction and training under Lightning DDP, on CPU processes (gloo), through the real ``make train`` entry point:
2 processes on one node, and 2 nodes of one process each started the way a cluster launcher starts them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT, TRAIN_CLI, run_train_cli, train_cli_env

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the DDP tests launch gloo processes on Linux")

# Digits at 32 px, small splits (50 / 85 / 90 images): an odd-sized split is what a distributed sampler pads.
COMMON = [
    "data.image_size=32",
    "data.shots_per_class=5",
    "data.val_fraction=0.05",
    "data.test_fraction=0.05",
    "head.epochs=2",
    "head.min_steps=0",
    "trainer.progress_bar=false",
]


def _entries(cache_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(cache_dir.glob("*/*")) if (p / "manifest.json").is_file()}


@pytest.fixture(scope="module")
def single_process_cache(tmp_path_factory) -> Path:
    """The cache one ordinary process writes: what every distributed run must reproduce byte for byte."""
    root = tmp_path_factory.mktemp("single")
    single = run_train_cli([*COMMON, f"paths.data_dir={root}", f"hydra.run.dir={root / 'run'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    return root / "cache"


def assert_same_cache(single: Path, distributed: Path, world_size: int) -> None:
    one, two = _entries(single), _entries(distributed)
    assert set(one) == set(two) and len(one) == 3  # same fingerprints: train, validation, test
    for name, path in one.items():
        m1 = json.loads((path / "manifest.json").read_text())
        m2 = json.loads((two[name] / "manifest.json").read_text())
        assert m1["parts"] == m2["parts"]
        assert "distributed" not in m1
        dist = m2["distributed"]
        assert dist["world_size"] == world_size and dist["duplicate_rows"] == 0
        assert sum(s["rows"] for s in dist["shards"]) == m1["num_samples"]
        for record in (m1["labels"], *m1["levels"].values()):
            a = np.load(path / record["file"])
            b = np.load(two[name] / record["file"])
            assert a.shape == b.shape and np.array_equal(a, b), f"{name}/{record['file']} differs"
    assert not list(distributed.glob("*/.partial-*")), "shards left behind"


def assert_every_test_image_counted_once(run_dir: Path) -> None:
    """Training ran under DDP too; test metrics count every test image exactly once (no padded repeats)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert any(n % 2 for n in metrics["split_sizes"].values()), metrics["split_sizes"]
    assert sum(map(sum, metrics["test_confusion"])) == metrics["split_sizes"]["test"]
    assert metrics["test"]["acc"] > 0.5


def test_two_process_extraction_writes_the_single_process_cache(tmp_path, single_process_cache):
    ddp = run_train_cli(
        [*COMMON, "trainer.devices=2", f"paths.data_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"]
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "with 2 processes" in ddp.stdout
    assert ddp.stdout.strip().splitlines()[-1] == f"run dir: {tmp_path / 'run'}"
    assert_same_cache(single_process_cache, tmp_path / "cache", world_size=2)
    assert_every_test_image_counted_once(tmp_path / "run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_write_the_single_process_cache(tmp_path, single_process_cache):
    """``trainer.num_nodes=2``: one process per "node", each started with its NODE_RANK and the shared master
    address, as SLURM or torchrun would start them (Lightning's cluster environment reads the ranks)."""
    args = [*COMMON, "trainer.num_nodes=2", f"paths.data_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"]
    port = str(_free_port())
    nodes = [
        subprocess.Popen(
            [*TRAIN_CLI, *args],
            cwd=ROOT,
            env=train_cli_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    assert "with 2 processes" in outputs[0][0]
    assert outputs[0][0].strip().splitlines()[-1] == f"run dir: {tmp_path / 'run'}"
    assert "run dir:" not in outputs[1][0], "only global rank 0 prints the result"
    assert_same_cache(single_process_cache, tmp_path / "cache", world_size=2)
    assert_every_test_image_counted_once(tmp_path / "run")
