"""Deciding a comparison: which model wins (chosen on labelled data only), by how much on test, at what cost.

- Selection: each regime's selection score (``compare.metric`` on its pooled out-of-fold predictions, or on a large
  given validation split: ``report.selection``). The one-standard-error rule: among the regimes whose score is within
  one standard error of the best, the cheapest wins; the standard error of each regime's gap to the best comes from
  the per-image differences of their out-of-fold predictions (the same images for every regime), because smaller
  gaps than that are noise. Cost: what the chosen model needs (extraction of exactly the levels and image size it
  reads, its probe fit, its training), per final run; selection time is reported beside it, not used.
- Test: the winner against every other regime on the same test images, a two-level paired bootstrap (seeds, then
  images: ``report.paired``) of the seed-averaged metric; Holm's adjustment over the winner's comparisons; ``clear``
  only when the adjusted p-value is below 0.05.
- What won is named as what it is: a regime whose final runs trained 0 epochs competes as its start (for partial and
  finetune a linear probe on pre-logits), and the verdict says so (``winner_model``).

Structured output only; ``render.verdict_text`` words it.
"""

from __future__ import annotations

import math

import numpy as np

from fmtransfer.metrics import METRIC_NAMES
from fmtransfer.report.paired import holm, paired_difference, paired_se

ALPHA = 0.05


def headline_shots(summary: dict) -> str:
    """The shots setting the verdict is about: ``all`` if compared, else the largest k."""
    keys = {k for by in summary.values() for k in by}
    return "all" if "all" in keys else str(max(int(k) for k in keys))


def selection_score(row: dict, metric: str) -> dict:
    """``{"metric", "score", "se", "n_scored"}``: the selection score and its binomial standard error over the
    images scored (Agresti-Coull's adjusted proportion keeps it above 0 at a perfect score). Shown in the tables;
    the one-SE rule uses the paired out-of-fold standard errors where the predictions exist."""
    if not row.get("val"):  # no selection was possible (a class with a single labelled image)
        return {"metric": metric, "score": None, "se": 0.0, "n_scored": 0}
    score = float(row["val"][metric]["mean"])
    n = int(row.get("n_scored") or 0)
    adjusted = (score * n + 2) / (n + 4)
    se = math.sqrt(adjusted * (1 - adjusted) / (n + 4)) if n > 0 else 0.0
    return {"metric": metric, "score": score, "se": se, "n_scored": n}


def trained_epochs(row: dict) -> int:
    """Epochs the final runs trained (mean over seeds, rounded): 0 means the model is the regime's start."""
    return round(row["epochs"]["mean"])


def _levels_text(levels: list[str] | None) -> str:
    levels = list(levels or [])
    return ", ".join(levels) if len(levels) <= 3 else f"all {len(levels)} levels"


# What a regime's final model is, by regime: (row, trained epochs) -> words. Regimes not listed: the regime's name.
DESCRIBE = {
    "frozen": lambda row, e: (
        f"{(row.get('head') or {}).get('name', 'a')} head on {_levels_text((row.get('head') or {}).get('levels'))}"
        f" of the frozen backbone"
    ),
    "partial": lambda row, e: (
        "linear probe, pre_logits" if e == 0 else f"last stages from {row.get('split_level')} + linear head"
    ),
    "finetune": lambda row, e: "linear probe, pre_logits" if e == 0 else "whole backbone + linear head, fine-tuned",
    "scratch": lambda row, e: (
        "untrained random backbone + linear head" if e == 0 else "whole backbone trained from random initialisation"
    ),
    **{
        regime: (lambda row, e: "linear probe, pre_logits" if e == 0 else f"{_tuned_text(row)} + linear head")
        for regime in ("bitfit", "lora", "surgical")
    },
}
# Their start is a linear probe on the frozen pre-logits (LP-FT).
STARTS_AS_PROBE = ("partial", "finetune", "bitfit", "lora", "surgical")


def _tuned_text(row: dict) -> str:
    """What a parameter-efficient regime trained of the backbone, e.g. "backbone biases and norms (43,016)"."""
    tuned = row.get("tuned") or {}
    return f"backbone {tuned.get('what', 'part')} ({tuned.get('backbone_params', 0):,} parameters)"


def model_description(regime: str, row: dict) -> dict:
    """``{"regime", "trained_epochs", "is"}``: what the regime's final model is, e.g. a kept-start finetune is
    ``{"regime": "finetune", "trained_epochs": 0, "is": "linear probe, pre_logits, 160 px"}``."""
    epochs = trained_epochs(row)
    what = DESCRIBE.get(regime, lambda row, e: regime)(row, epochs)
    size = f"{row['image_size'][-1]} px"
    trained = "" if epochs == 0 or regime == "frozen" else f", {epochs} epoch{'s' * (epochs != 1)}"
    return {"regime": regime, "trained_epochs": epochs, "is": f"{what}, {size}{trained}"}


def oof_gaps(metric: str, best: str, oof: dict, num_classes: int) -> dict[str, float | None]:
    """Each regime's paired standard error of its selection-score gap to ``best``, from the per-image out-of-fold
    predictions (``oof``: ``{regime: {"rows", "labels", "preds"}}``), on the images both scored; None where a
    regime has none."""
    out: dict[str, float | None] = {}
    ref = oof.get(best)
    for regime, o in oof.items():
        if ref is None:
            out[regime] = None
            continue
        rows, ia, ib = np.intersect1d(ref["rows"], o["rows"], return_indices=True)
        if not len(rows):
            out[regime] = None
            continue
        out[regime] = paired_se(metric, ref["labels"][ia], ref["preds"][ia], o["preds"][ib], num_classes)
    return out


def verdict(
    summary: dict, metric: str = "acc", paired: dict | None = None, oof: dict | None = None, num_classes: int = 0
) -> dict:
    """The decision for the headline shots setting.

    ``paired``: ``{"labels": (n,), "num_classes": int, "preds": {regime: (seeds, n)}}``, the test predictions of
    every run of that setting (absent for runs without ``test_predictions.csv``: their differences get no interval
    and are never called clear). ``oof``: ``{regime: {"rows", "labels", "preds"}}``, each regime's chosen out-of-fold
    predictions (absent: the best score's binomial standard error stands in for the paired one).
    ``num_classes``: for the macro metrics (defaults to ``paired``'s).
    """
    if metric not in METRIC_NAMES:
        raise ValueError(f"compare.metric={metric} is not known; choose from {METRIC_NAMES}")
    shots = headline_shots(summary)
    rows = {r: by[shots] for r, by in summary.items() if shots in by}
    selection = {r: selection_score(row, metric) for r, row in rows.items()}
    cost = {r: float(row["cost_seconds"]) for r, row in rows.items()}
    models = {r: model_description(r, row) for r, row in rows.items()}
    # Unscored regimes (1-shot: nothing to hold out) rank below every scored one; with none scored, the cheapest wins.
    score = {r: -1.0 if selection[r]["score"] is None else selection[r]["score"] for r in rows}
    best = max(rows, key=lambda r: (score[r], -cost[r]))
    num_classes = int(num_classes or (paired or {}).get("num_classes") or 0)
    gaps = oof_gaps(metric, best, oof, num_classes) if oof and best in oof else {}
    se = {r: gaps.get(r) if gaps.get(r) is not None else selection[best]["se"] for r in rows}
    within = [r for r in rows if score[best] - score[r] <= se[r] + 1e-12]
    winner = min(within, key=lambda r: (cost[r], -score[r]))

    preds = (paired or {}).get("preds", {})
    comparisons = []
    for other in sorted(rows, key=lambda r: -rows[r]["test"][metric]["mean"]):
        if other == winner:
            continue
        if winner in preds and other in preds:
            d = paired_difference(metric, paired["labels"], preds[winner], preds[other], paired["num_classes"])
        else:
            diff = rows[winner]["test"][metric]["mean"] - rows[other]["test"][metric]["mean"]
            d = {"diff": diff, "ci95": None, "p_value": None}
        comparisons.append(
            {
                "regime": other,
                **d,
                "cost_ratio": cost[other] / cost[winner] if cost[winner] > 0 else float("inf"),
            }
        )
    tested = [c for c in comparisons if c["p_value"] is not None]
    for c, p in zip(tested, holm([c["p_value"] for c in tested]), strict=True):
        c["p_adjusted"] = p
    for c in comparisons:
        c.setdefault("p_adjusted", None)
        c["clear"] = bool(c["p_adjusted"] is not None and c["p_adjusted"] < ALPHA)
    test_means = {r: rows[r]["test"][metric]["mean"] for r in rows}
    return {
        "shots": shots,
        "winner": winner,
        "winner_model": models[winner],
        "models": models,
        "metric": metric,
        "selected_on": (
            f"selection {metric} on pooled out-of-fold predictions; one-standard-error rule (paired per-image SE of "
            "each gap to the best), cheapest within"
        ),
        "selection": selection,
        "best_selection": best,
        "gap_se": se,
        "within_one_se": within,
        "cost_seconds": cost,
        "selection_seconds": {r: float(row.get("selection_seconds") or 0.0) for r, row in rows.items()},
        "comparisons": comparisons,
        "clear_means": f"Holm-adjusted p < {ALPHA} over the winner's {len(tested)} comparisons",
        # Regimes whose final runs trained 0 epochs: what they report is their start (e.g. a linear probe).
        "kept_start": [r for r in rows if models[r]["trained_epochs"] == 0],
        "best_on_test": max(test_means, key=test_means.get),
        # Cheaper than the winner: outside the one-SE band by construction; listed with their selection gap.
        "cheaper": [
            {
                "regime": r,
                "cost_ratio": cost[r] / cost[winner] if cost[winner] > 0 else float("inf"),
                "score_gap": score[winner] - score[r],
            }
            for r in sorted(rows, key=cost.get)
            if cost[r] < cost[winner]
        ],
    }


def paired_inputs(labels: np.ndarray, num_classes: int, preds: dict[str, list[np.ndarray]]) -> dict:
    """``verdict``'s ``paired`` argument from per-regime lists of per-seed prediction arrays."""
    return {"labels": labels, "num_classes": num_classes, "preds": {r: np.stack(p) for r, p in preds.items() if p}}
