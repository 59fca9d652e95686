"""Choosing a regime's settings on labelled data only, once per (regime, shots), before its final runs.

The protocol (after VTAB-1k's: tune on held-out labelled data, retrain on all of it, test once; and "true few-shot"
selection: with k labels per class, only those k may be used to choose):

- ``cv``: stratified k-fold cross-validation over the labelled pool (train + validation; under k-shot only the k
  shots per class). Every candidate setting of the regime's sweep (``compare.sweep.<regime>``) trains on each fold's
  rest and is scored on the fold; the score is over every pooled image (``n_scored`` = pool size). The best
  candidate's epochs are the median of its folds' best epochs; the final runs retrain on the whole pool for that many
  epochs (no validation left to pick a checkpoint) and touch the test split once. A regime whose folds never beat
  their starting weights (e.g. a linear probe) "kept its start".
- ``validation``: a given validation split of at least ``compare.selection.min_scored`` images (all shots) is used
  as it is: candidates train on train and are scored there; the final runs select their checkpoint on it.
- ``none``: a class with a single labelled image leaves nothing to hold out: the first candidate, its configured
  epochs, trained on the pool with no validation; no selection score.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fmtransfer.data import CrossValidation
from fmtransfer.data.splits import cv_folds_for
from fmtransfer.errors import ConfigError
from fmtransfer.metrics import METRIC_NAMES
from fmtransfer.regimes import load_data

RunFn = Callable[[str, DictConfig, Path], "dict | None"]  # (label, run config, run dir) -> metrics, None if skipped


@dataclass
class Selection:
    """What the selection chose for one (regime, shots), and on what evidence (``results.json``'s ``selection``)."""

    protocol: str  # cv | validation | none
    metric: str
    overrides: list[str]  # the chosen candidate
    score: float | None = None
    scores: dict | None = None  # every metric of the chosen candidate, pooled over the folds
    n_scored: int = 0
    folds: int = 0
    epochs: int | None = None  # refit epochs (cv) or None
    kept_start: bool = False
    candidates: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # training time of every selection run
    complete: bool = True  # False: the time budget stopped it before every candidate was scored

    def as_record(self) -> dict:
        return {
            "protocol": self.protocol,
            "metric": self.metric,
            "score": self.score,
            "n_scored": self.n_scored,
            "settings": {"overrides": self.overrides, "epochs": self.epochs},
            "folds": self.folds,
            "kept_start": self.kept_start,
            "candidates": self.candidates,
            "seconds": round(self.seconds, 3),
        }


def candidates_of(cfg: DictConfig, regime: str) -> list[list[str]]:
    """``compare.sweep.<regime>``: lists of ``key=value`` overrides of the run config; ``[[]]`` when none."""
    sweep = (cfg.compare.get("sweep") or {}).get(regime)
    out = [list(c) for c in sweep] if sweep else [[]]
    for cand in out:
        bad = [o for o in cand if "=" not in str(o)]
        if bad:
            raise ConfigError(f"compare.sweep.{regime}: {bad} are not key=value overrides (e.g. regime.k=2).")
    return out


def with_overrides(run: DictConfig, overrides: list[str]) -> DictConfig:
    """``run`` with ``key=value`` overrides merged in (keys must exist: a typo is an error, not a new key)."""
    out = OmegaConf.create(OmegaConf.to_container(run, resolve=False))
    for item in overrides:
        key, value = str(item).split("=", 1)
        if OmegaConf.select(out, key, default="__missing__") == "__missing__":
            raise ConfigError(f"compare.sweep: {key} is not a setting of the run config (in {item!r}).")
        OmegaConf.update(out, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=False)
    return out


def cv_settings(run: DictConfig, **cv) -> DictConfig:
    """``run`` with ``data.cv`` set to ``cv`` over ``CrossValidation``'s defaults (a fold, or a refit)."""
    out = OmegaConf.create(OmegaConf.to_container(run, resolve=False))
    out.data.cv = {**asdict(CrossValidation()), **cv}
    return out


def pooled_scores(fold_metrics: list[dict]) -> tuple[dict, int]:
    """Every metric over the folds, each fold weighted by its size (for accuracy exactly the pooled accuracy);
    and the number of images scored."""
    sizes = [int(m["split_sizes"]["validation"]) for m in fold_metrics]
    total = sum(sizes)
    pairs = list(zip(fold_metrics, sizes, strict=True))
    return {k: sum(m["val"][k] * n for m, n in pairs) / total for k in METRIC_NAMES}, total


def protocol_for(cfg: DictConfig, regime: str, shots: str, pool_labels: np.ndarray, given_validation: int) -> tuple:
    """``(protocol, folds)`` for this regime and pool."""
    sel = cfg.compare.selection
    if shots == "all" and given_validation >= int(sel.min_scored):
        return "validation", 0
    per_regime = (cfg.compare.get("folds") or {}).get(regime)
    folds = cv_folds_for(pool_labels, per_regime if per_regime is not None else sel.folds)
    return ("cv", folds) if folds >= 2 else ("none", 0)


def select(cfg: DictConfig, regime: str, shots: str, select_dir: Path, run: RunFn, base: DictConfig) -> Selection:
    """Choose ``regime``'s settings for ``shots`` (``base``: its run config at the selection seed)."""
    metric = cfg.compare.metric
    data = load_data(base)
    pool = np.asarray(data.splits["train"]["label"])
    if data.shots_per_class is None:
        pool = np.concatenate([pool, np.asarray(data.splits["validation"]["label"])])
    protocol, folds = protocol_for(cfg, regime, shots, pool, len(data.splits["validation"]))
    candidates = candidates_of(cfg, regime)
    if protocol == "none":
        return Selection("none", metric, candidates[0])
    if protocol == "validation" and len(candidates) == 1:
        return Selection("validation", metric, candidates[0])  # nothing to choose: the final runs give the score
    scored, seconds, complete = [], 0.0, True
    for c, overrides in enumerate(candidates):
        cand = with_overrides(base, overrides)
        fold_runs, run_dirs = [], []
        for f in range(max(folds, 1)):
            what = f"fold {f + 1}/{folds}" if protocol == "cv" else "validation"
            label = f"[select] {regime}, shots {shots}, candidate {c + 1}/{len(candidates)}, {what}"
            cfg_run = cv_settings(cand, folds=folds, fold=f) if protocol == "cv" else cand
            run_dir = select_dir / f"candidate{c}-{'fold' + str(f) if protocol == 'cv' else 'val'}"
            metrics = run(label, cfg_run, run_dir)
            if metrics is None:
                complete = False
                break
            fold_runs.append(metrics)
            run_dirs.append(str(run_dir))
            seconds += float(metrics["train_seconds"])
        if len(fold_runs) < max(folds, 1):
            break
        scores, n_scored = pooled_scores(fold_runs)
        missing = [m.get("run_dir", "a fold run") for m in fold_runs if m.get("best_epoch") is None]
        if missing:
            raise ConfigError(f"{regime}: fold runs without best_epoch in metrics.json: {missing}")
        best_epochs = [int(m["best_epoch"]) for m in fold_runs]
        scored.append(
            {
                "overrides": overrides,
                "score": scores[metric],
                "scores": scores,
                "n_scored": n_scored,
                "best_epochs": best_epochs,
                "kept_start": all(str(m.get("selected") or "").startswith("initial") for m in fold_runs),
                "run_dirs": run_dirs,
            }
        )
    if not scored:
        return Selection(protocol, metric, candidates[0], folds=folds, complete=False)
    chosen = max(scored, key=lambda s: s["score"])  # max keeps the first of equal scores: the sweep's first entry
    epochs = None
    if protocol == "cv":
        epochs = 0 if chosen["kept_start"] else max(1, round(statistics.median(chosen["best_epochs"])))
    return Selection(
        protocol,
        metric,
        chosen["overrides"],
        score=chosen["score"],
        scores=chosen["scores"],
        n_scored=chosen["n_scored"],
        folds=folds,
        epochs=epochs,
        kept_start=chosen["kept_start"],
        candidates=scored,
        seconds=seconds,
        complete=complete,
    )


def final_config(base: DictConfig, selection: Selection) -> DictConfig:
    """A final run's config: the chosen candidate; under cv (and none) a refit on the whole pool."""
    run = with_overrides(base, selection.overrides)
    if selection.protocol == "cv":
        return cv_settings(run, refit=True, epochs=selection.epochs)
    if selection.protocol == "none":
        return cv_settings(run, refit=True, epochs=None)
    return run
