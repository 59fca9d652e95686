"""Locating and composing the project's Hydra configs (also used by tests and notebooks)."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig


def config_dir() -> Path:
    """``configs/`` of this checkout (``FMTRANSFER_CONFIGS`` overrides)."""
    env = os.environ.get("FMTRANSFER_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "configs"


def compose_config(overrides: list[str] | None = None, name: str = "train") -> DictConfig:
    """Compose ``configs/<name>.yaml`` with command-line style overrides, outside of ``@hydra.main``."""
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose(name, overrides=overrides or [], return_hydra_config=False)
