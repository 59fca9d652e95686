"""Running a comparison: regimes x seeds x shots-per-class on the same splits, each run in its own directory.

Every run has its own directory under ``<report dir>/runs/``; a run whose ``metrics.json`` exists is not repeated,
so an interrupted comparison resumes where it stopped (and an interrupted run resumes from its last checkpoint).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fmtransfer.analysis import transfer_by_depth
from fmtransfer.errors import ConfigError
from fmtransfer.hashing import mapping_key, source_fingerprint
from fmtransfer.regimes import with_regime
from fmtransfer.report.schedule import RunScheduler, worker_count
from fmtransfer.report.selection import Selection, candidates_of, final_config, select

RUN_FIELDS = (
    "regime",
    "seed",
    "shots_per_class",
    "test",
    "val",
    "train_seconds",
    "seconds_per_epoch",
    "epochs",
    "trainable_params",
    "peak_memory_bytes",
    "peak_memory_kind",
    "image_size",
    "test_confusion",
    "start_test",
    "device",
    "selected",
    "precision",
    "channels_last",
    "leakage",
)

log = logging.getLogger(__name__)


def shots_key(shots) -> str:
    return "all" if shots in (None, "all") else str(int(shots))


def report_dir_for(cfg: DictConfig) -> Path:
    """A directory named by what is compared and by the code that compares it, so the same command with the same
    code finds (and resumes) the same comparison, and a code change never mixes old runs into a new report."""
    c = cfg.compare
    identity = OmegaConf.to_container(cfg, resolve=True)
    for volatile in ("compare", "paths", "resume", "logger"):
        identity.pop(volatile, None)
    identity["trainer"].pop("progress_bar", None)
    identity["code"] = source_fingerprint()
    identity["compare"] = {
        "regimes": list(c.regimes),
        "seeds": list(c.seeds),
        "shots": [shots_key(s) for s in c.shots],
        # How settings are chosen changes the fold runs and the final runs.
        "metric": c.get("metric"),
        **{k: OmegaConf.to_container(c[k]) for k in ("selection", "sweep") if k in c},
    }
    return Path(c.out_dir) / f"{c.name}-{c.preset}-{mapping_key(identity)}"


def run_config(cfg: DictConfig, regime: str, seed: int, shots) -> DictConfig:
    """The config of one run: ``regimes.<regime>`` as its regime, same splits (``data.split_seed`` fixed), this
    seed, this k-shot subset."""
    run = with_regime(cfg, regime)
    run.seed = seed
    run.data.shots_per_class = None if shots_key(shots) == "all" else int(shots)
    run.data.shots_seed = seed  # each seed sees its own k-shot subset: the spread covers the subset choice too
    return run


def plan_groups(cfg: DictConfig) -> list[tuple[str, str]]:
    """(shots, regime) of every selection, "all" shots first: the headline numbers are ready even if a long
    comparison is stopped early."""
    c = cfg.compare
    unknown = [r for r in c.regimes if r not in cfg.regimes]
    if unknown:
        raise ConfigError(f"compare.regimes has {unknown}; choose from {sorted(cfg.regimes)}.")
    shots_order = sorted(c.shots, key=lambda s: (shots_key(s) != "all", 0 if shots_key(s) == "all" else int(s)))
    return [(shots_key(k), r) for k in shots_order for r in c.regimes]


def planned_runs(cfg: DictConfig) -> dict[str, int]:
    """Training runs a comparison plans per regime, at most: each (regime, shots)'s candidates x folds, then a final
    run per seed. Folds are ``compare.selection.folds`` (a k-shot pool has at most k, none at k=1; a given
    validation split of ``min_scored`` images is one fold, which only the data can tell: counted as the folds)."""
    folds = int(cfg.compare.selection.folds)
    runs: dict[str, int] = {}
    for shots, regime in plan_groups(cfg):
        k = folds if shots == "all" else min(folds, int(shots))
        k = k if k >= 2 else 0  # a class of one image: no selection (protocol "none")
        runs[regime] = runs.get(regime, 0) + len(candidates_of(cfg, regime)) * k + len(cfg.compare.seeds)
    return runs


def extract_seconds_of(metrics: dict) -> float:
    """Build time of the train/validation caches the run read (hit or not: what the run would cost alone); runs
    from before ``cache_build_seconds``: the extraction the run itself did."""
    if metrics.get("cache_build_seconds") is not None:
        return float(metrics["cache_build_seconds"])
    frozen = (metrics.get("cache") or {}).get("extract_seconds")
    prefix = (metrics.get("partial") or {}).get("prefix_extract_seconds")
    return float(frozen or prefix or 0.0)


def run_record(metrics: dict, run_dir: Path, shots: str, selection: Selection) -> dict:
    """One final run as ``results.json`` lists it; ``val`` is the selection's score (pooled out-of-fold, or the
    given validation split's), ``selected`` says when the selection kept the regime's start (0 epochs trained)."""
    record = {k: metrics.get(k) for k in RUN_FIELDS}
    record.update(
        shots_per_class=shots,
        run_dir=str(run_dir),
        selection=selection.as_record(),
        extract_seconds=extract_seconds_of(metrics),
        probe_seconds=float(metrics.get("probe_seconds") or 0.0),
        test_predictions=str(run_dir / metrics["test_predictions"]) if metrics.get("test_predictions") else None,
        start_test_predictions=(
            str(run_dir / metrics["start_test_predictions"]) if metrics.get("start_test_predictions") else None
        ),
        head=metrics.get("head"),
        split_level=(metrics.get("partial") or {}).get("split_level"),
        tuned=metrics.get("tuned"),
    )
    record["val"] = selection.scores
    if selection.kept_start:
        record["selected"] = "initial state (the pooled validation loss was lowest at epoch 0: 0 epochs trained)"
    return record


def final_run_config(cfg: DictConfig, regime: str, seed: int, shots: str, selection: Selection) -> DictConfig:
    """A final run's config. A frozen head's final run caches exactly the levels its head reads, so its cost is
    the extraction the chosen model needs (not every level the selection's candidates read)."""
    final = final_config(run_config(cfg, regime, seed, shots), selection)
    if regime == "frozen":
        OmegaConf.update(final, "cache.levels", final.head.levels, merge=False)
    return final


def run_all(
    cfg: DictConfig, report_dir: Path, worker_setup: Callable[[], None] | None = None
) -> tuple[list[dict], list[dict]]:
    """Select, then run (or reuse) the final runs of every (regime, shots); returns the records of the final runs
    done, and the planned final runs not started because ``compare.time_budget_s`` ran out (``{"regime", "seed",
    "shots_per_class"}`` each). With ``compare.workers`` above 1 the groups run at once, their runs side by side in
    that many worker processes (each set up by ``worker_setup``)."""
    report_dir = report_dir.resolve()  # results.json names run dirs absolutely (not relative to the cwd of the run)
    workers = worker_count(cfg.compare.get("workers"), str(cfg.trainer.accelerator))
    groups = plan_groups(cfg)
    with RunScheduler(cfg.compare.get("time_budget_s"), workers, worker_setup) as runner:
        if workers > 1:
            log.info(f"{len(groups)} groups at once, runs side by side in {workers} worker processes")
            with ThreadPoolExecutor(len(groups)) as threads:
                done = list(
                    threads.map(lambda g: run_group(cfg, report_dir, runner, g, len(groups)), enumerate(groups, 1))
                )
        else:
            done = [run_group(cfg, report_dir, runner, g, len(groups)) for g in enumerate(groups, 1)]
    records = [r for group_records, _ in done for r in group_records]
    skipped = [s for _, group_skipped in done for s in group_skipped]
    if not records:
        raise ConfigError(
            f"compare.time_budget_s={cfg.compare.get('time_budget_s')}: the budget ran out before any final run "
            "finished; raise it."
        )
    return records, skipped


def run_group(
    cfg: DictConfig, report_dir: Path, runner: RunScheduler, group: tuple[int, tuple[str, str]], count: int
) -> tuple[list[dict], list[dict]]:
    """One (shots, regime): its selection, then a final run per seed: ``(records, not run)``."""
    g, (shots, regime) = group
    seeds = list(cfg.compare.seeds)
    base = run_config(cfg, regime, seeds[0], shots)
    select_dir = report_dir / "select" / f"{regime}-shots{shots}"
    selection = select(cfg, regime, shots, select_dir, runner, base)
    if not selection.complete:
        return [], [{"regime": regime, "seed": s, "shots_per_class": shots} for s in seeds]
    log.info(f"selected {g}/{count}: {regime}, shots {shots}: {describe_selection(selection)}")
    finals = []
    for seed in seeds:
        run_dir = report_dir / "runs" / f"{regime}-shots{shots}-seed{seed}"
        final = final_run_config(cfg, regime, seed, shots, selection)
        label = f"final {g}/{count}: {regime}, seed {seed}, shots {shots}"
        finals.append((seed, run_dir, runner.submit(label, final, run_dir)))
    records, skipped = [], []
    for seed, run_dir, future in finals:
        metrics = future.result()
        if metrics is None:
            skipped.append({"regime": regime, "seed": seed, "shots_per_class": shots})
        else:
            records.append(run_record(metrics, run_dir, shots, selection))
    return records, skipped


def describe_selection(selection: Selection) -> str:
    """One line for the log: how the settings were chosen."""
    chosen = " ".join(selection.overrides) or "the configured settings"
    if selection.protocol == "none":
        return f"no selection (a class has one labelled image): {chosen}, trained on the pool"
    how = f"{selection.folds}-fold CV" if selection.protocol == "cv" else "the given validation split"
    return (
        f"{chosen}: {how} {selection.metric} {selection.score:.4f} on {selection.n_scored} images; final runs "
        f"retrain on the pool for {selection.epochs} of {selection.horizon} planned epochs"
        f"{' (the start: 0 epochs trained)' if selection.kept_start else ''}"
    )


DEPTH_IMAGES = 10_000  # per fold side: the depth curve of a large pool costs what 10,000 images cost


def depth_curve(records: list[dict]) -> dict | None:
    """Linear-probe accuracy per cached level, out of fold: fitted on each selection fold's training part and
    scored on its held-out part (the fold runs of frozen's first candidate; at most ``DEPTH_IMAGES`` of each part,
    seeded), pooled over the folds."""
    from fmtransfer.cache import CachedSplit

    frozen = next((r for r in records if r["regime"] == "frozen" and r["shots_per_class"] == "all"), None)
    candidates = [c for c in ((frozen or {}).get("selection") or {}).get("candidates") or [] if not c.get("dropped")]
    if not candidates:
        return None
    correct: dict[str, float] = {}
    total = 0
    for run_dir in candidates[0]["run_dirs"]:
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
        entries = metrics["cache"]["entries"]
        splits = {s: CachedSplit.open(entries[s]) for s in ("train", "validation")}
        n = min(splits["validation"].num_samples, DEPTH_IMAGES)
        for level, acc in transfer_by_depth(splits["train"], splits["validation"], max_images=DEPTH_IMAGES).items():
            correct[level] = correct.get(level, 0.0) + acc * n
        total += n
    protocol = frozen["selection"]["protocol"]
    return {
        "split": "out of fold" if protocol == "cv" else "validation",
        "fit_on": "each fold's training part" if protocol == "cv" else "train",
        "n_scored": total,
        "accuracy": {level: c / total for level, c in correct.items()},
    }
