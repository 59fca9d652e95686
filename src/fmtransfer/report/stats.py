"""Summaries over seeds: mean, standard deviation and a 95% confidence interval (Student's t), per regime x shots."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats

from fmtransfer.metrics import METRIC_NAMES


def summarise(values: Sequence[float], bounds: tuple[float, float] | None = None) -> dict:
    """``{"mean", "std", "ci95": [lo, hi], "n"}``; with one value the spread is 0 and the interval a point.

    ``bounds`` clips the interval to a metric's range (accuracy cannot leave [0, 1], whatever t says).
    """
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else 0.0
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": mean, "std": std, "ci95": [lo, hi], "n": n}


def summarise_runs(records: list[dict]) -> dict:
    """``{regime: {shots: {"test": {metric: summary}, "val": ..., "train_seconds": ..., ...}}}`` over seeds."""
    out: dict = {}
    for rec in records:
        out.setdefault(rec["regime"], {}).setdefault(rec["shots_per_class"], []).append(rec)
    summary = {}
    for regime, by_shots in out.items():
        summary[regime] = {}
        for shots, recs in by_shots.items():
            summary[regime][shots] = (
                {
                    split: (
                        {m: summarise([r[split][m] for r in recs], bounds=(0.0, 1.0)) for m in METRIC_NAMES}
                        if all(r.get(split) for r in recs)
                        else None  # no selection score (a class with a single labelled image)
                    )
                    for split in ("test", "val")
                }
                | {
                    k: summarise([r[k] for r in recs])
                    for k in ("train_seconds", "seconds_per_epoch", "epochs", "peak_memory_bytes")
                }
                | {
                    # What the chosen model needs, per run, mean over seeds: extracting the levels and image size it
                    # reads (train/validation caches), fitting its linear-probe start, training.
                    "cost_seconds": sum(
                        r["train_seconds"] + (r.get("extract_seconds") or 0.0) + (r.get("probe_seconds") or 0.0)
                        for r in recs
                    )
                    / len(recs),
                    # Choosing its settings and epochs (every selection run): shown beside the cost, not part of it.
                    "selection_seconds": float((recs[0].get("selection") or {}).get("seconds") or 0.0),
                    "head": recs[0].get("head"),
                    "split_level": recs[0].get("split_level"),
                    "tuned": recs[0].get("tuned"),
                    "n_scored": (recs[0].get("selection") or {}).get("n_scored"),
                    "selection": recs[0].get("selection"),
                    "trainable_params": recs[0]["trainable_params"],
                    "peak_memory_kind": recs[0]["peak_memory_kind"],
                    "image_size": recs[0]["image_size"],
                    "seeds": [r["seed"] for r in recs],
                    # Runs that trained 0 epochs: the selection kept the starting weights.
                    "kept_start": sum(str(r.get("selected") or "").startswith("initial") for r in recs),
                }
            )
    return summary
