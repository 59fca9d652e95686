"""Running a comparison: regimes x seeds x shots-per-class on the same splits, each run in its own directory.

Every run has its own directory under ``<report dir>/runs/``; a run whose ``metrics.json`` exists is not repeated,
so an interrupted comparison resumes where it stopped (and an interrupted run resumes from its last checkpoint).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fmtransfer.analysis import transfer_by_depth
from fmtransfer.errors import ConfigError
from fmtransfer.hashing import mapping_key, source_fingerprint
from fmtransfer.regimes import run_regime, with_regime

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
    "device",
    "selected",
    "precision",
    "channels_last",
)


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
    identity["compare"] = {"regimes": list(c.regimes), "seeds": list(c.seeds), "shots": [shots_key(s) for s in c.shots]}
    return Path(c.out_dir) / f"{c.name}-{c.preset}-{mapping_key(identity)}"


def run_config(cfg: DictConfig, regime: str, seed: int, shots) -> DictConfig:
    """The config of one run: ``regimes.<regime>`` as its regime, same splits (``data.split_seed`` fixed), this
    seed, this k-shot subset."""
    run = with_regime(cfg, regime)
    run.seed = seed
    run.data.shots_per_class = None if shots_key(shots) == "all" else int(shots)
    run.data.shots_seed = seed  # each seed sees its own k-shot subset: the spread covers the subset choice too
    return run


def plan_runs(cfg: DictConfig) -> list[tuple[str, int, str]]:
    """(regime, seed, shots) of every run, "all" shots first: the headline numbers are ready even if a long
    comparison is stopped early."""
    c = cfg.compare
    unknown = [r for r in c.regimes if r not in cfg.regimes]
    if unknown:
        raise ConfigError(f"compare.regimes has {unknown}; choose from {sorted(cfg.regimes)}.")
    shots_order = sorted(c.shots, key=lambda s: (shots_key(s) != "all", 0 if shots_key(s) == "all" else int(s)))
    return [(r, s, shots_key(k)) for k in shots_order for s in c.seeds for r in c.regimes]


def selection_of(metrics: dict, metric: str) -> dict:
    """How the run's checkpoint and the regime were chosen: the validation score, on how many labelled images, with
    which settings."""
    return {
        "metric": metric,
        "score": metrics["val"][metric],
        "n_scored": metrics["split_sizes"]["validation"],
        "settings": metrics.get("regime_config") or metrics.get("head"),
    }


def extract_seconds_of(metrics: dict) -> float:
    """Build time of the train/validation caches the run read (hit or not: what the run would cost alone); runs
    from before ``cache_build_seconds``: the extraction the run itself did."""
    if metrics.get("cache_build_seconds") is not None:
        return float(metrics["cache_build_seconds"])
    frozen = (metrics.get("cache") or {}).get("extract_seconds")
    prefix = (metrics.get("partial") or {}).get("prefix_extract_seconds")
    return float(frozen or prefix or 0.0)


def run_all(cfg: DictConfig, report_dir: Path) -> tuple[list[dict], list[dict]]:
    """Run (or reuse) every planned run; returns the records of those run, in plan order, and the planned runs not
    started because ``compare.time_budget_s`` ran out (``{"regime", "seed", "shots_per_class"}`` each)."""
    plan = plan_runs(cfg)
    budget = cfg.compare.get("time_budget_s")
    started = time.perf_counter()
    records, skipped, longest = [], [], 0.0
    for i, (regime, seed, shots) in enumerate(plan, 1):
        run_dir = report_dir / "runs" / f"{regime}-shots{shots}-seed{seed}"
        done = run_dir / "metrics.json"
        label = f"[compare {i}/{len(plan)}] {regime}, seed {seed}, shots {shots}"
        if done.is_file():
            print(f"{label}: done earlier, reusing {done}")
            metrics = json.loads(done.read_text())
        elif budget is not None and time.perf_counter() - started + longest > budget:
            # A run is started only if the longest run so far would still end within the budget.
            print(f"{label}: not run (compare.time_budget_s={budget} would be exceeded)")
            skipped.append({"regime": regime, "seed": seed, "shots_per_class": shots})
            continue
        else:
            print(f"{label}: running")
            start = time.perf_counter()
            metrics = run_regime(run_config(cfg, regime, seed, shots), run_dir)
            seconds = time.perf_counter() - start
            longest = max(longest, seconds)
            print(f"{label}: test acc {metrics['test']['acc']:.4f} in {seconds:.0f} s")
        record = {k: metrics.get(k) for k in RUN_FIELDS}
        record.update(
            shots_per_class=shots,
            run_dir=str(run_dir),
            selection=selection_of(metrics, cfg.compare.metric),
            extract_seconds=extract_seconds_of(metrics),
            test_predictions=str(run_dir / metrics["test_predictions"]) if metrics.get("test_predictions") else None,
        )
        records.append(record)
    if not records:
        raise ConfigError(f"compare.time_budget_s={budget}: the budget ran out before any run finished; raise it.")
    return records, skipped


def depth_curve(records: list[dict]) -> dict | None:
    """Linear-probe accuracy per cached level (validation split), from the frozen run of the first seed."""
    from fmtransfer.cache import CachedSplit

    frozen = next((r for r in records if r["regime"] == "frozen" and r["shots_per_class"] == "all"), None)
    if frozen is None:
        return None
    metrics = json.loads((Path(frozen["run_dir"]) / "metrics.json").read_text())
    entries = metrics["cache"]["entries"]
    splits = {s: CachedSplit(Path(p), json.loads((Path(p) / "manifest.json").read_text())) for s, p in entries.items()}
    return {
        "split": "validation",
        "fit_on": "train",
        "accuracy": transfer_by_depth(splits["train"], splits["validation"]),
    }
