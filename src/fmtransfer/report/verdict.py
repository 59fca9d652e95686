"""Deciding a comparison: which regime wins (chosen on validation), by how much on test, at what cost.

Structured output only; ``render.verdict_text`` words it.
"""

from __future__ import annotations


def headline_shots(summary: dict) -> str:
    """The shots setting the verdict is about: ``all`` if compared, else the largest k."""
    keys = {k for by in summary.values() for k in by}
    return "all" if "all" in keys else str(max(int(k) for k in keys))


def verdict(summary: dict) -> dict:
    """``{"shots", "winner", "selected_on", "comparisons": {regime: {...}}, "best_on_test", "cheaper"}``.

    The winner has the best mean validation accuracy (ties: the cheaper one). ``comparisons`` (ordered by test
    accuracy) holds the winner's lead in test points, whether the seed-spread 95% intervals overlap, and each
    regime's training time as a ratio of the winner's; ``cheaper`` lists regimes faster than the winner and no more
    than 1 point below it on test.
    """
    shots = headline_shots(summary)
    rows = {r: by[shots] for r, by in summary.items() if shots in by}
    winner = max(rows, key=lambda r: (rows[r]["val"]["acc"]["mean"], -rows[r]["train_seconds"]["mean"]))
    w = rows[winner]
    wt, wacc = w["train_seconds"]["mean"], w["test"]["acc"]
    comparisons = {}
    for other, o in sorted(rows.items(), key=lambda kv: -kv[1]["test"]["acc"]["mean"]):
        if other == winner:
            continue
        oacc, ot = o["test"]["acc"], o["train_seconds"]["mean"]
        comparisons[other] = {
            "delta_points": (wacc["mean"] - oacc["mean"]) * 100,
            "intervals_overlap": not (wacc["ci95"][0] > oacc["ci95"][1] or oacc["ci95"][0] > wacc["ci95"][1]),
            "time_ratio": ot / wt if wt > 0 else float("inf"),
        }
    cheaper = [
        r
        for r in rows
        if r != winner and rows[r]["train_seconds"]["mean"] < wt and comparisons[r]["delta_points"] <= 1.0
    ]
    return {
        "shots": shots,
        "winner": winner,
        "selected_on": "mean validation accuracy over seeds",
        "comparisons": comparisons,
        "best_on_test": max(rows, key=lambda r: rows[r]["test"]["acc"]["mean"]),
        "cheaper": cheaper,
    }
