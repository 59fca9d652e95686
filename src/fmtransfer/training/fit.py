"""The fit loop every regime shares: train, select the checkpoint on validation, evaluate the test split once.

The starting weights compete in model selection too (early stopping that includes step 0): a run that starts from a
fitted probe (LP-FT, partial) keeps it when no epoch of fine-tuning improves the validation loss. They are scored
in the fit's sanity check over the whole validation split, so precision and DDP reduction are those of every other
validation, and the score is stored in the run dir, so a resumed run still compares against its true start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from fmtransfer.backbone import preparation_seconds
from fmtransfer.errors import ConfigError
from fmtransfer.heads import HeadClassifier
from fmtransfer.metrics import METRIC_NAMES
from fmtransfer.training.callbacks import BestEpoch, EpochTimer, PeakMemory, ValidationCurve

log = logging.getLogger(__name__)

# In the checkpoint dir: {"score": validation loss, "metrics": every val/* metric, "val_predictions": per image}.
START_FILE = "start.pt"


def reseed(seed: int) -> None:
    """Seed everything again just before something random is built or trained, so a run's numbers do not depend on
    what ran before it in the process (e.g. whether the cache missed and a backbone was built)."""
    pl.seed_everything(seed, workers=True, verbose=False)


def epochs_for(num_train: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """``epochs``, raised so training takes at least ``min_steps`` optimiser steps (k-shot sets are one batch)."""
    steps_per_epoch = max(1, -(-num_train // batch_size))
    return max(epochs, -(-min_steps // steps_per_epoch))


def validation_interval(epochs: int, validations_per_run: int) -> int:
    """Epochs between validations so that a run validates about ``validations_per_run`` times.

    A few-shot run has many one-step epochs; validating a large validation split after each of them would cost far
    more than training, while a score every few epochs is plenty to pick the checkpoint.
    """
    if int(validations_per_run) < 1:
        raise ConfigError(f"trainer.validations_per_run={validations_per_run} must be at least 1.")
    return max(1, epochs // int(validations_per_run))


def _checkpoints(trainer: pl.Trainer) -> tuple[ModelCheckpoint, ModelCheckpoint | None]:
    """The checkpoint that selects on a monitored metric, and the periodic resume point (``monitor: null``)."""
    best = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    last = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and not c.monitor]
    if not best:
        raise ConfigError("callbacks: a ModelCheckpoint with a monitor (best_checkpoint) is needed to select weights.")
    return best[0], (last[0] if last else None)


def _callback(trainer: pl.Trainer, kind: type):
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


@dataclass
class StartingScore:
    """The starting weights on validation: ``monitor``'s value, every ``val/*`` metric, per-image outputs."""

    score: float
    metrics: dict[str, float]
    predictions: dict | None


class PhaseClock:
    """A run's wall seconds by phase (``lap``), with the model's one-time preparation on its first forward
    (``preparation_seconds``) counted apart as ``prepare``, whichever phase's pass paid it."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.phases: dict[str, float] = {"prepare": 0.0}
        self._began, self._prepared = time.perf_counter(), preparation_seconds(module)

    def lap(self, name: str) -> float:
        """The seconds since the last lap (or the clock's start), less the preparation in them, added to ``name``."""
        now, prepared = time.perf_counter(), preparation_seconds(self.module)
        prepare = prepared - self._prepared
        seconds = now - self._began - prepare
        self.phases["prepare"] += prepare
        self.phases[name] = self.phases.get(name, 0.0) + seconds
        self._began, self._prepared = now, prepared
        return seconds


class StartingValidation(pl.Callback):
    """Scores the starting weights in the fit's own sanity check, run over the whole validation split (the fit's
    setup is paid once, not again by a separate ``trainer.validate``), and stores the score in ``store`` before the
    first training step, so a resumed run still compares against its true start. Sanity-check values reach no
    logger: the logs (and the report's learning curves read from them) hold one validation per epoch."""

    def __init__(self, monitor: str, store: Path):
        self.monitor, self.store = monitor, store
        self.start: StartingScore | None = None
        self.seconds = 0.0
        self._clock: PhaseClock | None = None

    # Timed as ``EpochTimer`` times every later validation pass (epoch start to end): the validation loader the
    # sanity check builds first is the fit's, built once whether or not a start is scored. The model's one-time
    # preparation on its first forward (``preparation_seconds``) is the run's, not the start's: left out.
    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.sanity_checking:
            self._clock = PhaseClock(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            self.seconds = self._clock.lap("start_score")

    def on_sanity_check_end(self, trainer, pl_module):
        metrics = pl_module.sanity_metrics or {}
        if self.monitor not in metrics:
            return
        self.start = StartingScore(metrics[self.monitor], metrics, getattr(pl_module, "val_predictions", None))
        if trainer.is_global_zero:
            self.store.parent.mkdir(parents=True, exist_ok=True)
            saved = {"score": self.start.score, "metrics": metrics, "val_predictions": self.start.predictions}
            tmp = self.store.with_suffix(".tmp")
            torch.save(saved, tmp)
            tmp.replace(self.store)  # never a half-written start: a resumed run would trust it


def _stored_start(store: Path) -> StartingScore | None:
    """The start scored before an interruption, or None."""
    if not store.is_file():
        return None
    saved = torch.load(store, map_location="cpu", weights_only=True)
    return StartingScore(float(saved["score"]), saved.get("metrics") or {}, saved.get("val_predictions"))


def fit_select_test(
    trainer: pl.Trainer,
    module: HeadClassifier,
    datamodule: pl.LightningDataModule,
    seed: int,
    include_start: bool = True,
    refit: bool = False,
    evaluate_test: bool = True,
    test_start: bool = False,
) -> dict:
    """Train ``module`` on ``datamodule``; pick the checkpoint on validation; evaluate the test split once, with it.

    ``trainer`` comes with its callbacks (a monitoring ``ModelCheckpoint`` at least; ``EpochTimer`` and
    ``PeakMemory`` when present). A resume point (``last.ckpt``) left by an interrupted run is resumed from.
    ``refit``: the trainer runs no validation (its epochs were chosen by cross-validation); the weights after the
    last epoch are the model (with 0 epochs: the starting weights, e.g. the linear probe of LP-FT).
    ``evaluate_test=False`` (a cross-validation fold): no test evaluation; ``test`` is None.
    ``test_start`` (a refit that trains from a fitted start, e.g. LP-FT's probe): the starting weights are scored on
    the test split too, before training, as ``start_test`` and ``start_test_predictions``: a reference for what
    training changed on test, which nothing chooses by.
    """
    if refit:
        return _refit_test(trainer, module, datamodule, seed, test_start)
    best, last = _checkpoints(trainer)
    last_path = Path(last.dirpath) / f"{last.filename}.ckpt" if last is not None else None
    resuming = last_path is not None and last_path.is_file()
    if resuming:
        log.info(f"resuming from {last_path}")
    store = Path(best.dirpath) / START_FILE
    start, starting, weights = None, None, None
    curve = ValidationCurve()
    trainer.num_sanity_val_steps = 0  # the start's validation is the only one before training, when it is wanted
    if include_start and best.monitor == "val/loss" and best.mode == "min":
        # The module holds its starting weights until fit (a resumed run rebuilds the same start): kept in memory
        # in case no epoch beats them.
        weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        start = _stored_start(store)
        if start is None:
            starting = StartingValidation(best.monitor, store)
            trainer.callbacks.append(starting)
            trainer.num_sanity_val_steps = float("inf")
    best_epoch = BestEpoch(best.monitor, best.mode)
    trainer.callbacks += [best_epoch, curve]
    reseed(seed)
    clock = PhaseClock(module)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last_path) if resuming else None)
    clock.lap("fit")
    start_seconds = starting.seconds if starting is not None else 0.0
    clock.phases["fit"] -= start_seconds  # the start was scored in the fit's sanity check
    clock.phases["start_score"] = start_seconds
    train_seconds = clock.phases["fit"]
    if starting is not None:
        start = starting.start
    if start is not None:
        curve.add(0, start.predictions)
    selected, best_path = "best epoch", str(best.best_model_path)
    kept_start = start is not None and (best.best_model_score is None or start.score < float(best.best_model_score))
    if kept_start:
        selected = "initial state (no epoch improved the validation loss)"
        module.load_state_dict(weights)
        best_path = None  # a fold run, which tests nothing, needs no checkpoint of its starting weights
        if evaluate_test:
            best_path = str(Path(best.dirpath) / "initial.ckpt")
            trainer.save_checkpoint(best_path)
    # The selected weights' validation metrics were computed when they were scored (the start's, or the best
    # epoch's validation): validating them again would cost a pass and give the same numbers.
    val = (start.metrics if kept_start else best_epoch.metrics) if start is not None else {}
    if not all(f"val/{m}" in val for m in METRIC_NAMES):
        ckpt_path = None if kept_start and not evaluate_test else best_path  # the module holds the start then
        val = trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)[0]
    # Model selection used validation only; the test split is evaluated once, with the selected weights.
    test = trainer.test(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)[0] if evaluate_test else None
    clock.lap("final_evaluation")
    phases = clock.phases
    return {
        "val": {m: round(float(val[f"val/{m}"]), 6) for m in METRIC_NAMES},
        "best_epoch": 0 if kept_start else best_epoch.epochs,
        **_test_results(trainer, module, test, train_seconds, phases, trained=not kept_start),
        "best_checkpoint": best_path,
        "selected": selected,
        "val_curve": _curve_arrays(curve),
        "planned_epochs": int(trainer.max_epochs or 0),
    }


def _curve_arrays(curve: ValidationCurve) -> dict | None:
    """``{"epochs": (E,), "probs": (E, n, classes), "labels": (n,)}`` of every validation of the run, or None."""
    if not curve.probs or curve.labels is None:
        return None
    epochs = sorted(curve.probs)
    probs = np.empty((len(epochs), *curve.probs[epochs[0]].shape), dtype=np.float32)
    for i, epoch in enumerate(epochs):  # moved epoch by epoch: never the curve twice in memory
        probs[i] = curve.probs.pop(epoch).numpy()
    return {"epochs": np.asarray(epochs, dtype=np.int64), "probs": probs, "labels": curve.labels.numpy()}


def _refit_test(
    trainer: pl.Trainer, module: HeadClassifier, datamodule: pl.LightningDataModule, seed: int, test_start: bool
) -> dict:
    """Train for the trainer's epochs without validation, save the final weights, evaluate the test split once with
    them (and, with ``test_start`` and epochs to train, the starting weights before training, for reference)."""
    dirpath = next((Path(c.dirpath) for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    # Nothing to monitor without validation: the selecting checkpoint would only warn.
    trainer.callbacks = [c for c in trainer.callbacks if not (isinstance(c, ModelCheckpoint) and c.monitor)]
    clock = PhaseClock(module)
    start_test = _test_start(trainer, module, datamodule) if test_start and trainer.max_epochs else None
    clock.lap("start_score")
    reseed(seed)
    if trainer.max_epochs:
        trainer.fit(module, datamodule=datamodule)
    train_seconds = clock.lap("fit")
    final_path = None
    if dirpath is not None:
        dirpath.mkdir(parents=True, exist_ok=True)
        final_path = str(dirpath / "final.ckpt")
        # Tensors only: loadable with torch.load(weights_only=True), and written whether or not fit ran.
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}, final_path)
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    clock.lap("final_evaluation")
    phases = clock.phases
    if start_test is None:
        del phases["start_score"]  # no start scored: nothing to report
    epochs = trainer.max_epochs
    return {
        "val": None,
        "best_epoch": None,
        **_test_results(trainer, module, test, train_seconds, phases, trained=bool(epochs)),
        "best_checkpoint": final_path,
        "selected": f"final weights after {epochs} epoch{'s' * (epochs != 1)} (chosen by cross-validation)",
        "planned_epochs": int(module.hparams.max_epochs),
        **(start_test or {}),
    }


def _test_start(trainer: pl.Trainer, module: HeadClassifier, datamodule: pl.LightningDataModule) -> dict:
    """``{"start_test": metrics, "start_test_predictions": per image}`` of ``module``'s starting weights, which it
    keeps (Lightning restores every submodule's train/eval mode after the test loop)."""
    scored = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    return {
        "start_test": {m: round(float(scored[f"test/{m}"]), 6) for m in METRIC_NAMES},
        "start_test_predictions": module.test_predictions,
    }


def _test_results(
    trainer: pl.Trainer, module: HeadClassifier, test: dict | None, train_seconds: float, phases: dict, trained: bool
) -> dict:
    """What every fit reports besides validation and selection: test metrics, sizes, times, memory, device.
    ``trained=False``: the model is its start (0 epochs), whose only fitted parameters are its head's (a probe)."""
    timer, memory = _callback(trainer, EpochTimer), _callback(trainer, PeakMemory)
    epoch_seconds = timer.seconds if timer is not None else []
    validations = timer.validation_seconds if timer is not None else []
    tested = test is not None
    return {
        "test": {m: round(float(test[f"test/{m}"]), 6) for m in METRIC_NAMES} if tested else None,
        "test_per_class": module.test_per_class if tested else None,
        "test_confusion": module.test_confusion if tested else None,
        "test_predictions": module.test_predictions if tested else None,
        "trainable_params": sum(
            p.numel() for p in (module.parameters() if trained else module.head.parameters()) if p.requires_grad
        ),
        "train_seconds": round(train_seconds, 3),
        "phase_seconds": phases,
        "epochs": len(epoch_seconds),
        "seconds_per_epoch": round(sum(epoch_seconds) / max(1, len(epoch_seconds)), 4),
        # One validation pass during fit (None: none ran), the yardstick of the run's start and final evaluations.
        "seconds_per_validation": round(sum(validations) / len(validations), 4) if validations else None,
        "peak_memory_bytes": int(memory.peak_bytes) if memory is not None else None,
        "peak_memory_kind": memory.kind if memory is not None else None,
        "device": str(trainer.strategy.root_device),
        "precision": str(trainer.precision),
    }
