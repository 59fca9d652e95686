"""Deciding a comparison: which regime wins (chosen on labelled data only), by how much on test, at what cost.

- Selection: each regime's selection score (``compare.metric``; cross-validated over the labelled pool, or a large
  given validation split: ``report.selection``) with its standard error over the ``n_scored`` images scored. The
  one-standard-error rule: among the regimes whose score is within one standard error of the best, the cheapest wins
  (cost = training time + building the train/validation caches it reads), because smaller gaps than that are noise.
- Test: the winner against every other regime on the same test images, a paired bootstrap of the seed-averaged
  metric (``report.paired``); ``clear`` only when the paired 95% interval of the difference excludes 0.

Structured output only; ``render.verdict_text`` words it.
"""

from __future__ import annotations

import math

import numpy as np

from fmtransfer.metrics import METRIC_NAMES
from fmtransfer.report.paired import paired_difference


def headline_shots(summary: dict) -> str:
    """The shots setting the verdict is about: ``all`` if compared, else the largest k."""
    keys = {k for by in summary.values() for k in by}
    return "all" if "all" in keys else str(max(int(k) for k in keys))


def selection_score(row: dict, metric: str) -> dict:
    """``{"metric", "score", "se", "n_scored"}``: the mean validation score and its binomial standard error over the
    validation images (for accuracy; an approximation for the macro averages). Agresti-Coull's adjusted proportion
    keeps the error above 0 at a perfect score: 112 of 112 right does not mean no uncertainty."""
    if not row.get("val"):  # no selection was possible (a class with a single labelled image)
        return {"metric": metric, "score": None, "se": 0.0, "n_scored": 0}
    score = float(row["val"][metric]["mean"])
    n = int(row.get("n_scored") or 0)
    adjusted = (score * n + 2) / (n + 4)
    se = math.sqrt(adjusted * (1 - adjusted) / (n + 4)) if n > 0 else 0.0
    return {"metric": metric, "score": score, "se": se, "n_scored": n}


def verdict(summary: dict, metric: str = "acc", paired: dict | None = None) -> dict:
    """The decision for the headline shots setting.

    ``paired``: ``{"labels": (n,), "num_classes": int, "preds": {regime: (seeds, n)}}``, the test predictions of
    every run of that setting (absent for runs without ``test_predictions.csv``: their differences get no interval
    and are never called clear).
    """
    if metric not in METRIC_NAMES:
        raise ValueError(f"compare.metric={metric} is not known; choose from {METRIC_NAMES}")
    shots = headline_shots(summary)
    rows = {r: by[shots] for r, by in summary.items() if shots in by}
    selection = {r: selection_score(row, metric) for r, row in rows.items()}
    cost = {r: float(row["cost_seconds"]) for r, row in rows.items()}
    # Unscored regimes (1-shot: nothing to hold out) rank below every scored one; with none scored, the cheapest wins.
    score = {r: -1.0 if selection[r]["score"] is None else selection[r]["score"] for r in rows}
    # A regime every run of which kept its start trained nothing past it: what it reports (and costs) is its start,
    # for partial and finetune a linear probe on the frozen features. It competes as that, and is named as that.
    kept = [r for r, row in rows.items() if row["kept_start"] and row["kept_start"] == len(row["seeds"])]
    best = max(rows, key=lambda r: (score[r], -cost[r]))
    threshold = score[best] - selection[best]["se"]
    within = [r for r in rows if score[r] >= threshold]
    winner = min(within, key=lambda r: (cost[r], -score[r]))

    preds = (paired or {}).get("preds", {})
    comparisons = []
    for other in sorted(rows, key=lambda r: -rows[r]["test"][metric]["mean"]):
        if other == winner:
            continue
        if winner in preds and other in preds:
            d = paired_difference(metric, paired["labels"], preds[winner], preds[other], paired["num_classes"])
            clear = not (d["ci95"][0] <= 0.0 <= d["ci95"][1])
        else:
            diff = rows[winner]["test"][metric]["mean"] - rows[other]["test"][metric]["mean"]
            d, clear = {"diff": diff, "ci95": None, "p_value": None}, False
        comparisons.append(
            {
                "regime": other,
                **d,
                "clear": bool(clear),
                "cost_ratio": cost[other] / cost[winner] if cost[winner] > 0 else float("inf"),
            }
        )
    test_means = {r: rows[r]["test"][metric]["mean"] for r in rows}
    return {
        "shots": shots,
        "winner": winner,
        "metric": metric,
        "selected_on": f"validation {metric}, mean over seeds; one-standard-error rule, cheapest within",
        "selection": selection,
        "best_selection": best,
        "one_se_threshold": threshold,
        "within_one_se": within,
        "cost_seconds": cost,
        "comparisons": comparisons,
        # Regimes every run of which kept its starting weights: what they report is their start (e.g. a linear probe).
        "kept_start": kept,
        "best_on_test": max(test_means, key=test_means.get),
        # Cheaper than the winner: outside the one-SE band by construction; listed with their selection gap.
        "cheaper": [
            {
                "regime": r,
                "cost_ratio": cost[r] / cost[winner],
                "score_gap": score[winner] - score[r],
            }
            for r in sorted(rows, key=cost.get)
            if cost[r] < cost[winner]
        ],
    }


def paired_inputs(labels: np.ndarray, num_classes: int, preds: dict[str, list[np.ndarray]]) -> dict:
    """``verdict``'s ``paired`` argument from per-regime lists of per-seed prediction arrays."""
    return {"labels": labels, "num_classes": num_classes, "preds": {r: np.stack(p) for r, p in preds.items() if p}}
