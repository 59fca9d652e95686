"""One run of the regime a config names: the regime, its Trainer/callbacks/loggers and its data, all from config."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from fmtransfer.errors import ConfigError
from fmtransfer.training import TrainingTools, instantiate_training

log = logging.getLogger(__name__)


class Regime(Protocol):
    """What ``configs/regime/<name>.yaml`` instantiates: a named way of training, run on one config."""

    name: str

    def run(
        self, cfg: DictConfig, run_dir: Path, tools: TrainingTools, callbacks: Sequence[pl.Callback] = ()
    ) -> dict: ...


def for_run_dir(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """``cfg`` resolved for one run: ``paths.output_dir`` (checkpoints, loggers) is ``run_dir``."""
    run = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    run.paths.output_dir = str(run_dir)
    return OmegaConf.create(OmegaConf.to_container(run, resolve=True))


def with_regime(cfg: DictConfig, name: str) -> DictConfig:
    """``cfg`` with ``regime`` set to the settings of ``regimes.<name>`` (make compare and make bench hold every
    regime's settings there, composed from the same ``regime/`` group)."""
    if name not in cfg.get("regimes", {}):
        raise ConfigError(f"regime {name!r} is not known; choose one of {sorted(cfg.get('regimes', {}))}.")
    run = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    run.regime = run.regimes[name]
    return run


def run_regime(cfg: DictConfig, run_dir: Path, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """Run ``cfg.regime`` with ``cfg``'s Trainer, callbacks and loggers, writing into ``run_dir``; returns its
    ``metrics.json``."""
    cfg = for_run_dir(cfg, run_dir)
    if "_target_" not in cfg.get("regime", {}):
        raise ConfigError("regime: not a regime config; choose one from configs/regime/, e.g. regime=partial.")
    regime: Regime = hydra.utils.instantiate(cfg.regime, _convert_="all")
    log.info(f"{regime.name} regime -> {run_dir}")
    return regime.run(cfg, run_dir, instantiate_training(cfg), callbacks)
