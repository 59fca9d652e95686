"""Faults lose nothing: killed extraction, full disk, interrupted training; and the cache round-trips exactly."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmtransfer.cache import CacheEntryWriter, FeatureCache, pool_map
from fmtransfer.cache.store import FORMAT_VERSION
from fmtransfer.cli.config import compose_config
from fmtransfer.errors import CacheError
from fmtransfer.regimes import run_regime

ROOT = Path(__file__).resolve().parents[1]


def test_sigkill_during_extraction_then_rerun_rebuilds_cleanly(tmp_path):
    """A real process killed with SIGKILL mid-extraction; the next run never reads the partial cache."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    args = [
        sys.executable,
        "-m",
        "fmtransfer.cli.train",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "data.image_size=64",
        "head.epochs=2",
        "trainer.progress_bar=false",
    ]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache_root = tmp_path / "data" / "cache" / "tf_efficientnet_lite0"
    deadline = time.time() + 300
    while time.time() < deadline and not list(cache_root.glob(".partial-*/*.npy")):
        assert proc.poll() is None, "the run ended before extraction started"
        time.sleep(0.02)
    time.sleep(0.5)  # let it write some batches
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(cache_root.glob(".partial-*")), "the kill should have left a partial directory"
    assert not list(cache_root.glob("*/manifest.json")) or all(
        (p.parent / "labels.npy").exists() for p in cache_root.glob("*/manifest.json")
    )
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(cache_root.glob(".partial-*")), "partials are cleaned by the next builder"
    assert len(list(cache_root.glob("*/manifest.json"))) == 3


def test_disk_full_during_write_is_a_clear_error_and_publishes_nothing(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    writer = cache.writer("bb", "train", "k")
    writer.create(4, {"level0": (3, 2, 2)}, np.float16)

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(CacheError, match="No space left on device"):
        writer.write(np.arange(4), np.zeros(4), {"level0": np.zeros((4, 3, 2, 2))})
    monkeypatch.undo()
    with pytest.raises(CacheError, match="wrote 0 of 4 samples"):
        writer.publish({"levels": {"level0": {}}})
    writer.abort()
    assert not any(p.is_dir() for p in (tmp_path / "bb").iterdir())


class _CrashAfter(pl.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash during training")


def test_interrupted_training_resumes_from_its_last_checkpoint(tmp_path, tiny_overrides):
    cfg = compose_config([*tiny_overrides, "head.epochs=6", "trainer.checkpoint_every_s=0"])
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_regime(cfg, run_dir, callbacks=[_CrashAfter(2)])
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file() and not (run_dir / "metrics.json").exists()
    assert torch.load(last, weights_only=False)["epoch"] <= 2
    metrics = run_regime(cfg, run_dir)
    assert metrics["cache"]["hit"] is True
    import csv

    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    trained = sorted({int(r["epoch"]) for r in rows if r["train/loss"]})
    assert trained[0] >= 2, f"resumed run restarted from scratch (epochs {trained})"
    assert trained[-1] == 5, f"resumed run did not finish all 6 epochs (epochs {trained})"
    assert (run_dir / "metrics.json").is_file()


def test_resume_through_the_cli_uses_the_saved_config(tmp_path, tiny_overrides, capsys):
    from fmtransfer.cli.train import resume_target
    from fmtransfer.errors import FmtransferError

    with pytest.raises(FmtransferError, match=r"no config\.yaml"):
        resume_target(str(tmp_path))
    # Interrupted before its first checkpoint (60 s by default): resuming starts that run again, same config.
    cfg = compose_config([*tiny_overrides, "head.name=mlp"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_regime(cfg, tmp_path / "cut", callbacks=[_CrashAfter(0)])
    assert not (tmp_path / "cut" / "checkpoints" / "last.ckpt").exists()
    run_dir, saved = resume_target(str(tmp_path / "cut"))
    assert run_dir == tmp_path / "cut" and saved.head.name == "mlp"
    assert "starting it again from the first step" in capsys.readouterr().out
    run_regime(saved, run_dir)
    with pytest.raises(FmtransferError, match="that run finished"):
        resume_target(str(run_dir))


_shapes = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 6)),
        st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)),
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 17),
    shapes=_shapes,
    dtype=st.sampled_from(["float16", "float32"]),
    pool=st.sampled_from(["none", "avg", "global"]),
    pool_size=st.integers(1, 5),
    batch=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_cache_round_trips_any_shape_dtype_and_pooling(
    tmp_path_factory, n, shapes, dtype, pool, pool_size, batch, seed
):
    rng = np.random.default_rng(seed)
    maps = {
        f"level{i}": torch.from_numpy(rng.standard_normal((n, *s)).astype(np.float32)) for i, s in enumerate(shapes)
    }
    pooled = {k: pool_map(v, pool, pool_size).numpy().astype(dtype) for k, v in maps.items()}
    labels = rng.integers(0, 5, n)
    root = tmp_path_factory.mktemp("cache")
    cache = FeatureCache(root)
    writer: CacheEntryWriter = cache.writer("bb", "train", "key")
    writer.create(n, {k: v.shape[1:] for k, v in pooled.items()}, np.dtype(dtype))
    order = rng.permutation(n)  # batches arrive in any order (e.g. from several ranks)
    for start in range(0, n, batch):
        idx = order[start : start + batch]
        writer.write(idx, labels[idx], {k: v[idx] for k, v in pooled.items()})
    parts = {"dtype": dtype, "pool": pool, "levels": sorted(pooled)}
    manifest = {
        "parts": parts,
        "num_samples": n,
        "class_names": list("abcde"),
        "levels": {k: {"shape": list(v.shape[1:])} for k, v in pooled.items()},
    }
    writer.publish(manifest)
    (root / "bb" / "train-key").rename(root / "bb" / f"train-{__import__('fmtransfer').hashing.mapping_key(parts)}")
    found = cache.find("bb", "train", parts, sorted(pooled))
    assert found is not None and found.manifest["format_version"] == FORMAT_VERSION
    np.testing.assert_array_equal(found.labels(), labels)
    for k, v in pooled.items():
        got = found.level(k)
        assert got.dtype == np.dtype(dtype) and got.shape == v.shape
        np.testing.assert_array_equal(np.asarray(got), v)
