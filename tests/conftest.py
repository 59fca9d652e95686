"""Shared fixtures: everything runs offline on the CPU with real images (scikit-learn digits, skimage photos)."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never reach a hub, whatever network the machine has.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from fmtransfer.cli.common import configure_logging  # noqa: E402 - after the offline switches

configure_logging()  # fmtransfer's log lines on stdout, as the entry points print them (tests read them)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


TRAIN_CLI = [sys.executable, "-m", "fmtransfer.cli.train"]  # what ``make train`` runs


def train_cli_env(**extra: str) -> dict[str, str]:
    """The environment for a ``TRAIN_CLI`` process: offline, plus ``extra`` variables."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    env.pop("LOCAL_RANK", None)  # never look like a DDP child of the test process
    return env


def run_train_cli(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m fmtransfer.cli.train ARGS`` in a fresh process, offline."""
    return subprocess.run(
        [*TRAIN_CLI, *args], cwd=ROOT, env=train_cli_env(), capture_output=True, text=True, timeout=600
    )


def digits_images(n_per_class: int = 12, classes: int = 3) -> list[tuple[Image.Image, int]]:
    """Real handwritten digits (scikit-learn's bundled scans), as 8-bit grayscale PIL images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for cls in range(classes):
        idx = np.flatnonzero(d.target == cls)[:n_per_class]
        for i in idx:
            px = np.clip(np.rint(d.images[i] * 255 / 16), 0, 255).astype(np.uint8)
            out.append((Image.fromarray(px, mode="L").resize((32, 32), Image.NEAREST), cls))
    return out


def write_image_folder(root: Path, splits: dict[str, int], classes: int = 3) -> Path:
    """An ImageFolder ``root/<split>/<class>/*.png`` of real digits; ``splits`` maps split name -> images per class."""
    offset = 0
    for split, n in splits.items():
        images = digits_images(offset + n, classes)
        for k, (img, cls) in enumerate(images):
            if k % (offset + n) < offset:
                continue
            folder = root / split / f"digit{cls}"
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{split}_{k}.png")
        offset += n
    return root


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    """Overrides for a fast, isolated run: digits at 32 px, few shots, few epochs, caches and logs under tmp."""
    return [
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "data.image_size=32",
        "data.shots_per_class=10",
        "head.epochs=3",
        "head.min_steps=0",
        "trainer.progress_bar=false",
    ]


def bare_trainer(max_epochs: int = 1, callbacks=()):
    """A Lightning Trainer on the CPU with nothing around the fit: no logger, checkpoints, progress bar or summary."""
    import pytorch_lightning as pl

    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def shared_dataset(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {name} not found at {path} (the ../shared/datasets folder is absent)")
    return path
