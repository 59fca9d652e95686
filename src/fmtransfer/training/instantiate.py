"""Trainer, callbacks and loggers instantiated from config (lightning-hydra-template's shape): the one place in
training that reads a config. Everything below it takes plain arguments."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from fmtransfer.data import is_selection_run
from fmtransfer.training.allocator import malloc_settings, tune_malloc
from fmtransfer.training.fit import validation_interval
from fmtransfer.training.placement import Placement, Precision, resolve_placement, resolve_precision

# ``trainer.*`` keys that are fmtransfer's, not the Trainer's (see configs/trainer/default.yaml).
RUN_SETTINGS = (
    "progress_bar",
    "checkpoint_every_s",
    "validations_per_run",
    "channels_last",
    "resident_data_mb",
    "malloc",
)
# The Trainer settings an extraction Trainer shares with training (it has no logger, callbacks or epochs).
DEVICE_SETTINGS = ("accelerator", "precision", "devices", "num_nodes", "strategy")


@dataclass
class TrainingTools:
    """What a run needs to build its Trainers: made once per run by ``instantiate_training``."""

    make_trainer: Callable[..., pl.Trainer]  # the configured Trainer, waiting for a run's own arguments
    make_callbacks: Callable[[], list[pl.Callback]]
    make_loggers: Callable[[], list]
    placement: Placement
    precision: Precision
    extraction_kwargs: dict  # Trainer arguments for extraction (Trainer.predict): devices, precision, progress bar
    validations_per_run: int
    seed: int
    # False for a selection run (a cross-validation fold, or the given validation split as the one "fold"): it is
    # scored on its held-out images, and the test split is left to the final runs (each touches it once).
    evaluate_test: bool = True

    def fit_trainer(
        self, epochs: int, callbacks: Sequence[pl.Callback] = (), trains_backbone: bool = False, validate: bool = True
    ) -> pl.Trainer:
        """A Trainer for one fit of ``epochs`` epochs: fresh callbacks and loggers from config, plus ``callbacks``;
        in the backbone's precision when the fit trains (part of) a backbone, else in the heads'. ``validate=False``
        (a refit on the whole labelled pool) runs no validation loop."""
        extra = {} if validate else {"limit_val_batches": 0, "num_sanity_val_steps": 0}
        return self.make_trainer(
            **extra,
            precision=self.precision.backbone if trains_backbone else self.precision.head,
            max_epochs=epochs,
            check_val_every_n_epoch=validation_interval(max(1, epochs), self.validations_per_run),
            callbacks=[*self.make_callbacks(), *callbacks],
            logger=self.make_loggers() or False,
        )


def _instantiate_all(group: DictConfig | None) -> list:
    """Every ``_target_`` entry of a callbacks/logger group (entries set to null are left out)."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if c is not None and "_target_" in c]


def instantiate_training(cfg: DictConfig) -> TrainingTools:
    """``cfg.trainer``, ``cfg.callbacks`` and ``cfg.logger`` of one run (``cfg.paths.output_dir`` set to its dir)."""
    t = cfg.trainer
    trainer_cfg = OmegaConf.masked_copy(t, [k for k in t if k not in RUN_SETTINGS])
    devices = OmegaConf.to_container(t.devices) if OmegaConf.is_list(t.devices) else t.devices
    placement = resolve_placement(t.accelerator, devices, t.num_nodes, t.channels_last, t.resident_data_mb)
    precision = resolve_precision(str(t.precision), placement.cuda)
    tune_malloc(malloc_settings(t.get("malloc")))
    return TrainingTools(
        make_trainer=hydra.utils.instantiate(trainer_cfg, _partial_=True),
        make_callbacks=lambda: _instantiate_all(cfg.get("callbacks")),
        make_loggers=lambda: _instantiate_all(cfg.get("logger")),
        placement=placement,
        precision=precision,
        extraction_kwargs={
            **{k: OmegaConf.to_container(t[k]) if OmegaConf.is_list(t[k]) else t[k] for k in DEVICE_SETTINGS},
            "precision": precision.extraction,
            "enable_progress_bar": t.progress_bar,
        },
        validations_per_run=t.validations_per_run,
        seed=cfg.seed,
        evaluate_test=not is_selection_run(cfg.data.get("cv")),
    )
