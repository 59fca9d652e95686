"""Choosing a regime's settings and epochs on labelled data only, once per (regime, shots), before its final runs.

One protocol for every regime of a comparison (after VTAB-1k's: tune on held-out labelled data, retrain on all of
it, test once; and "true few-shot" selection: with k labels per class, only those k may be used to choose):

- ``cv``: stratified, group-aware k-fold cross-validation over the labelled pool (train + validation; under k-shot
  only the k shots per class); the same folds for every regime (copies of one image stay in one fold). Every
  candidate of the regime's sweep (``compare.sweep.<regime>``) trains on each fold's rest and keeps its per-image
  probabilities on the fold at every validated epoch, the start (epoch 0) included.
- ``validation``: a given validation split of at least ``compare.selection.min_scored`` images (all shots) is the
  one "fold": candidates train on train and are scored there.
- ``none``: a class with a single labelled image leaves nothing to hold out: the first candidate, its configured
  epochs, trained on the pool with no validation; no selection score.

A candidate's epoch is the argmin of its validation loss over the pooled out-of-fold predictions (the fold-size-
weighted mean of the folds' losses), over the epochs every fold validated; its score is ``compare.metric`` on those
pooled predictions at that epoch. The best-scoring candidate wins. A race (``compare.selection.race``: the regimes
it applies to) runs every candidate's first fold first and drops those that trail the best there by more than
``race_se`` paired standard errors (Maron & Moore's racing, with a paired z-test): they run no other fold, are not
scored, and the report lists them as dropped. The final runs retrain on the whole pool for that
many epochs on the folds' learning-rate schedule (``data.cv.horizon``), without validation, and touch the test split
once; chosen epoch 0 means the start was kept and the final runs train 0 epochs.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fmtransfer.data import CrossValidation
from fmtransfer.data.images import label_array
from fmtransfer.data.splits import cv_folds_for
from fmtransfer.errors import ConfigError
from fmtransfer.metrics import METRIC_NAMES
from fmtransfer.regimes import load_data
from fmtransfer.regimes.context import write_npz
from fmtransfer.report.paired import metric_value, paired_se
from fmtransfer.report.schedule import RunScheduler

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """What the selection chose for one (regime, shots), and on what evidence (``results.json``'s ``selection``)."""

    protocol: str  # cv | validation | none
    metric: str
    overrides: list[str]  # the chosen candidate
    score: float | None = None
    scores: dict | None = None  # every metric of the chosen candidate, pooled over the folds
    n_scored: int = 0
    folds: int = 0  # cv: k; validation: 1 (the given split)
    epochs: int | None = None  # the chosen epoch: what the final runs train (0: the start); None: configured
    horizon: int | None = None  # the folds' planned epochs: the final runs' learning-rate schedule
    kept_start: bool = False
    candidates: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # wall time of every selection run
    complete: bool = True  # False: the time budget stopped it before every candidate was scored
    oof: str | None = None  # the chosen candidate's pooled out-of-fold predictions (npz: rows, labels, probs)

    def as_record(self) -> dict:
        return {
            "protocol": self.protocol,
            "metric": self.metric,
            "score": self.score,
            "n_scored": self.n_scored,
            "settings": {"overrides": self.overrides, "epochs": self.epochs, "horizon": self.horizon},
            "folds": self.folds,
            "kept_start": self.kept_start,
            "candidates": self.candidates,
            "n_candidates": len(self.candidates),
            "seconds": round(self.seconds, 3),
            "oof": self.oof,
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


def user_keys(overrides: list[str]) -> list[str]:
    """The config keys a user's command-line overrides set (``key=value``; group choices such as ``head=mlp`` set
    everything under ``head``); experiment choices and ``compare.*`` settings are not run settings."""
    keys = []
    for item in overrides:
        if "=" not in str(item):
            continue
        key = str(item).split("=", 1)[0].lstrip("+~")
        if key != "experiment" and not key.startswith(("compare.", "hydra.")):
            keys.append(key)
    return keys


def sweep_without(sweep: dict, keys: list[str]) -> dict:
    """``compare.sweep`` with every setting a user's override also sets removed from its candidates (the user's
    value wins; duplicates left behind are merged). ``regimes.<regime>.x`` is that regime's ``regime.x``."""

    def overridden(regime: str, item: str) -> bool:
        key = str(item).split("=", 1)[0]
        for user in keys:
            user = user.replace(f"regimes.{regime}.", "regime.", 1) if user.startswith(f"regimes.{regime}.") else user
            # The same key, one under the user's, or one holding the user's (a candidate's whole head.options).
            if key == user or key.startswith(f"{user}.") or user.startswith(f"{key}."):
                return True
        return False

    out = {}
    for regime, candidates in sweep.items():
        kept: list[list[str]] = []
        for cand in candidates or []:
            cand = [o for o in cand if not overridden(regime, o)]
            if cand not in kept:
                kept.append(cand)
        out[regime] = kept or [[]]
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


def candidate_curve(folds: list[dict], num_classes: int) -> dict:
    """Pool the folds' out-of-fold predictions of one candidate and choose its epoch.

    ``folds``: per fold ``{"epochs": (E,), "probs": (E, n, classes), "labels": (n,), "rows": (n,)}``. Returns
    ``{"epoch", "loss": {epoch: pooled loss}, "scores": {metric: value at epoch}, "rows", "labels", "probs"}`` with the
    pooled arrays sorted by pool row. The loss at an epoch is the mean cross-entropy over every pooled image: the
    fold-size-weighted mean of the folds' validation losses. Ties go to the earlier epoch (less training).
    """
    common = sorted(set.intersection(*(set(int(e) for e in f["epochs"]) for f in folds)))
    if not common:
        raise ConfigError("the cross-validation folds share no validated epoch; raise trainer.validations_per_run.")
    rows = np.concatenate([f["rows"] for f in folds])
    order = np.argsort(rows, kind="stable")
    labels = np.concatenate([f["labels"] for f in folds])[order]

    def probs_at(epoch: int) -> np.ndarray:
        at = [f["probs"][list(map(int, f["epochs"])).index(epoch)] for f in folds]
        return np.concatenate(at)[order]

    loss = {}
    for epoch in common:
        p = probs_at(epoch)
        loss[epoch] = float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None)).mean())
    epoch = min(common, key=lambda e: (loss[e], e))
    probs = probs_at(epoch)
    preds = probs.argmax(1)
    scores = {m: metric_value(m, labels, preds, num_classes) for m in METRIC_NAMES}
    out = {"epoch": epoch, "loss": loss, "scores": scores, "rows": rows[order], "labels": labels, "probs": probs}
    if 0 in common:  # the start on the same folds: did training beat it, by more than the paired SE of the gain?
        start = probs_at(0).argmax(1)
        out["start_scores"] = {m: metric_value(m, labels, start, num_classes) for m in METRIC_NAMES}
        out["gain_se"] = {m: paired_se(m, labels, preds, start, num_classes) for m in METRIC_NAMES}
    return out


def read_curve(run_dir: Path, metrics: dict) -> dict:
    """A selection run's ``val_predictions.npz`` as arrays."""
    if not metrics.get("val_curve"):
        raise ConfigError(f"{run_dir}: a selection run without per-epoch validation predictions (val_curve).")
    with np.load(Path(run_dir) / metrics["val_curve"]) as z:
        return {k: z[k] for k in ("epochs", "probs", "labels", "rows")}


def protocol_for(cfg: DictConfig, shots: str, pool_labels: np.ndarray, given_validation: int) -> tuple[str, int]:
    """``(protocol, folds)`` for this pool: the same for every regime of a comparison."""
    sel = cfg.compare.selection
    if shots == "all" and given_validation >= int(sel.min_scored):
        return "validation", 1
    folds = cv_folds_for(pool_labels, sel.folds)
    return ("cv", folds) if folds >= 2 else ("none", 0)


def select(
    cfg: DictConfig, regime: str, shots: str, select_dir: Path, runner: RunScheduler, base: DictConfig
) -> Selection:
    """Choose ``regime``'s settings and epochs for ``shots`` (``base``: its run config at the selection seed)."""
    metric = cfg.compare.metric
    data = load_data(base)
    pool = label_array(data.splits["train"])
    if data.shots_per_class is None:
        pool = np.concatenate([pool, label_array(data.splits["validation"])])
    protocol, folds = protocol_for(cfg, shots, pool, len(data.splits["validation"]))
    candidates = candidates_of(cfg, regime)
    if protocol == "none":
        return Selection("none", metric, candidates[0])
    race = protocol == "cv" and len(candidates) > 1 and regime in (cfg.compare.selection.get("race") or [])

    def submit(c: int, f: int) -> tuple[int, Path, Future]:
        cand = with_overrides(base, candidates[c])
        what = f"fold {f + 1}/{folds}" if protocol == "cv" else "validation"
        label = f"select: {regime}, shots {shots}, candidate {c + 1}/{len(candidates)}, {what}"
        if protocol == "cv":
            cfg_run, run_dir = cv_settings(cand, folds=folds, fold=f), select_dir / f"candidate{c}-fold{f}"
        else:
            cfg_run, run_dir = cv_settings(cand, given_validation=True), select_dir / f"candidate{c}-val"
        return c, run_dir, runner.submit(label, cfg_run, run_dir)

    # Every candidate's fold runs are submitted first (a scheduler with workers runs them side by side); a race
    # submits the first fold's, then the other folds of the candidates it kept.
    submitted = [submit(c, f) for c in range(len(candidates)) for f in range(1 if race else folds)]
    dropped: dict[int, dict] = {}
    if race:
        first = {c: (run_dir, future) for c, run_dir, future in submitted}
        dropped = race_first_fold(first, metric, data.num_classes, float(cfg.compare.selection.race_se))
        for c, record in dropped.items():
            d = record["dropped"]
            log.info(
                f"select: {regime}, shots {shots}: candidate {c + 1} ({' '.join(candidates[c])}) dropped after fold 1: "
                f"{metric} {d['score']:.3f} vs {d['best_score']:.3f}, {d['diff']:+.3f} ± {d['se']:.3f} (paired SE)"
            )
        submitted += [submit(c, f) for c in range(len(candidates)) if c not in dropped for f in range(1, folds)]
    scored, records, seconds = [], [], 0.0
    complete = True
    for c, overrides in enumerate(candidates):
        curves, run_dirs, horizons = [], [], []
        for run_dir, future in [(d, f) for i, d, f in submitted if i == c]:
            metrics = future.result()
            if metrics is None:
                complete = False
                continue
            curves.append(read_curve(run_dir, metrics))
            run_dirs.append(str(run_dir))
            horizons.append(int(metrics.get("planned_epochs") or 0))
            seconds += float(metrics.get("total_seconds") or metrics["train_seconds"])
        if c in dropped:
            records.append({"overrides": overrides, **dropped[c], "run_dirs": run_dirs})
            continue
        if len(curves) < folds:
            continue
        curve = candidate_curve(curves, data.num_classes)
        scored.append(
            {
                "overrides": overrides,
                "score": curve["scores"][metric],
                "scores": curve["scores"],
                "n_scored": len(curve["rows"]),
                "epoch": curve["epoch"],
                "horizon": max(horizons),
                "loss_by_epoch": {str(e): round(v, 6) for e, v in curve["loss"].items()},
                # The start's score on the same folds, and the paired SE of the chosen epoch's gain over it.
                "start_scores": curve.get("start_scores"),
                "gain_se": curve.get("gain_se"),
                "run_dirs": run_dirs,
                "_curve": curve,
            }
        )
        records.append(scored[-1])
    if not scored:
        return Selection(protocol, metric, candidates[0], folds=folds, complete=False)
    chosen = max(scored, key=lambda s: s["score"])  # max keeps the first of equal scores: the sweep's first entry
    select_dir.mkdir(parents=True, exist_ok=True)
    compare_candidates(scored, chosen, metric, data.num_classes, select_dir)
    for s in scored:
        s.pop("_curve")
    return Selection(
        protocol,
        metric,
        chosen["overrides"],
        score=chosen["score"],
        scores=chosen["scores"],
        n_scored=chosen["n_scored"],
        folds=folds,
        epochs=chosen["epoch"],
        horizon=chosen["horizon"],
        kept_start=chosen["epoch"] == 0,
        candidates=records,
        seconds=seconds,
        complete=complete,
        oof=chosen["oof"],
    )


def race_first_fold(first: dict[int, tuple[Path, Future]], metric: str, num_classes: int, z: float) -> dict[int, dict]:
    """The candidates a race drops after the first fold (``first``: candidate -> its first fold's run directory and
    future): those whose ``metric`` there, at the epoch of their lowest loss on that fold, trails the best
    candidate's by more than ``z`` paired standard errors on the same images. Returns candidate -> ``{"dropped":
    {"after_folds": 1, "score", "best_score", "diff", "se", "epoch"}}``; a fold the time budget stopped races
    nothing."""
    curves = {}
    for c, (run_dir, future) in first.items():
        metrics = future.result()
        if metrics is None:
            return {}
        curves[c] = candidate_curve([read_curve(run_dir, metrics)], num_classes)
    best = max(curves, key=lambda c: curves[c]["scores"][metric])  # the first of equal scores
    best_preds = curves[best]["probs"].argmax(1)
    out = {}
    for c, curve in curves.items():
        diff = curve["scores"][metric] - curves[best]["scores"][metric]
        se = paired_se(metric, curve["labels"], curve["probs"].argmax(1), best_preds, num_classes)
        if c != best and -diff > z * se:
            out[c] = {
                "dropped": {
                    "after_folds": 1,
                    "score": round(curve["scores"][metric], 6),
                    "best_score": round(curves[best]["scores"][metric], 6),
                    "diff": round(diff, 6),
                    "se": round(se, 6),
                    "epoch": curve["epoch"],
                }
            }
    return out


def compare_candidates(scored: list[dict], chosen: dict, metric: str, num_classes: int, select_dir: Path) -> None:
    """Each scored candidate's pooled out-of-fold predictions written to ``candidate<i>-oof.npz`` (its ``oof``),
    and its score's paired difference from the chosen candidate's on the same images, with the paired SE
    (``vs_chosen``: ``{"diff", "se"}``; the chosen one's is 0)."""
    best = chosen["_curve"]["probs"].argmax(1)
    for i, cand in enumerate(scored):
        curve = cand["_curve"]
        path = select_dir / f"candidate{i}-oof.npz"
        write_npz(path, rows=curve["rows"], labels=curve["labels"], probs=curve["probs"].astype(np.float32))
        preds = curve["probs"].argmax(1)
        cand["oof"] = str(path)
        cand["vs_chosen"] = {
            "diff": round(cand["score"] - chosen["score"], 6),
            "se": round(paired_se(metric, curve["labels"], preds, best, num_classes), 6),
        }


def final_config(base: DictConfig, selection: Selection) -> DictConfig:
    """A final run's config: the chosen candidate, refit on the whole pool for the chosen epochs on the folds'
    schedule (no selection: its configured epochs)."""
    run = with_overrides(base, selection.overrides)
    return cv_settings(run, refit=True, epochs=selection.epochs, horizon=selection.horizon)
