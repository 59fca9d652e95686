"""``report.md`` (figures beside it) and a self-contained ``report.html`` (figures embedded), from ``results``."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from fmtransfer.report import plots
from fmtransfer.report.paired import RESAMPLES
from fmtransfer.report.verdict import STARTS_AS_PROBE, selection_score

MEMORY_KINDS = {"gpu_max_allocated": "GPU", "cpu_heap_in_use": "heap", "cpu_rss_increase": "RSS"}
METRIC_LABELS = {"acc": "accuracy", "f1_macro": "macro-F1", "balanced_acc": "balanced accuracy"}


def time_ratio_text(ratio: float) -> str:
    """``3.2× the winner's time`` or ``1/25 of the winner's time``."""
    if ratio >= 0.5:
        return f"{ratio:.1f}× the winner's time"
    return f"1/{1 / ratio:.0f} of the winner's time" if ratio > 0 else "no measurable time"


def p_value_text(p: float) -> str:
    """``= 0.241``, or ``< 0.002`` at the bootstrap's floor (no resample crossed 0: 2 / (resamples + 1))."""
    return f"< {2 / (RESAMPLES + 1) * 1.001:.3f}" if p <= 2 / (RESAMPLES + 1) * 1.001 else f"= {p:.3f}"


def _interval(ci) -> str:
    return f"[{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]" if ci else "(no per-image predictions)"


def winner_phrase(verdict: dict) -> str:
    """The verdict's subject: the winning regime, or, when its final runs trained 0 epochs, what it is (its start)."""
    model = verdict.get("winner_model") or {"regime": verdict["winner"], "trained_epochs": None}
    if model.get("trained_epochs") == 0 and model["regime"] != "frozen":
        return f"**A {model['is']}** (the start of {model['regime']}: 0 epochs trained)"
    return f"**{model['regime']}** ({model['is']})" if model.get("is") else f"**{model['regime']}**"


def verdict_text(verdict: dict, summary: dict) -> str:
    """The verdict (``report.verdict.verdict``) in words, with the numbers it rests on."""
    shots, winner, metric = verdict["shots"], verdict["winner"], verdict["metric"]
    label = METRIC_LABELS[metric]
    rows = {r: by[shots] for r, by in summary.items() if shots in by}
    w, sel = rows[winner], verdict["selection"]
    test = w.get("test_bootstrap", {}).get(metric) or w["test"][metric]
    n = len(w["seeds"])
    best = verdict["best_selection"]
    models = verdict.get("models") or {}
    gap_se = verdict.get("gap_se") or {}
    why = (
        f"the best selection {label}"
        if best == winner
        else (
            f"the cheapest within one standard error of the best selection {label} ({best}: "
            f"{score_text(sel[best])}; gap {(sel[best]['score'] - sel[winner]['score']) * 100:.1f} points, paired "
            f"SE {(gap_se.get(winner) or 0.0) * 100:.1f})"
        )
    )
    lines = [
        f"{winner_phrase(verdict)} wins with {'all training images' if shots == 'all' else f'{shots} images per class'}"
        f": {why}, {score_text(sel[winner])} on {sel[winner]['n_scored']} labelled images "
        f"({protocol_text(w.get('selection'), n, shots)}). Test {label} {test['mean']:.3f} "
        f"(95% CI {test['ci95'][0]:.3f}–{test['ci95'][1]:.3f}, seeds and test images resampled); "
        f"{w['trainable_params']:,} trainable parameters, {verdict['cost_seconds'][winner]:.1f} s per run (what the "
        f"model needs: extraction of the levels and image size it reads, probe fit, training)."
    ]
    model = verdict.get("winner_model") or {}
    if model.get("trained_epochs") == 0 and model.get("regime") in STARTS_AS_PROBE:
        lines.append(
            f"Fine-tuning did not improve on a linear probe: {model['regime']}'s selection found its lowest pooled "
            "validation loss at epoch 0, so its final runs keep the probe it starts from (LP-FT's first stage)."
        )
    if verdict["comparisons"]:
        lines.append(
            f"Against the others on the test split (paired, seeds and test images resampled; intervals unadjusted, "
            f"p-values Holm-adjusted over {len(verdict['comparisons'])} comparisons, clear when adjusted p < 0.05):"
        )
    for c in verdict["comparisons"]:
        other, o = c["regime"], rows[c["regime"]]
        p = "" if c["p_value"] is None else f", p {p_value_text(c['p_value'])} (adjusted {c['p_adjusted']:.3f})"
        what = models.get(other, {}).get("is", other)
        clear = "a clear difference" if c["clear"] else "not a clear difference"
        lines.append(
            f"- vs **{other}** ({what}; {o['test'][metric]['mean']:.3f} on test): {c['diff'] * 100:+.1f} points, "
            f"95% interval {_interval(c['ci95'])}{p}: {clear}; {o['trainable_params']:,} trainable parameters, "
            f"{verdict['cost_seconds'][other]:.1f} s ({time_ratio_text(c['cost_ratio'])})."
        )
    for regime in verdict["kept_start"]:
        if regime == winner:
            continue
        lines.append(
            f"{regime} trained 0 epochs (its lowest pooled validation loss was its start): it competes as its start "
            f"({models.get(regime, {}).get('is', regime)})."
        )
    for regime, row in rows.items():
        epochs = models.get(regime, {}).get("trained_epochs")
        gain = gain_over_start(row.get("selection"), metric)
        if regime in STARTS_AS_PROBE and epochs and gain:
            score, start, se = gain
            clear = "more than" if score - start > se else "within"
            against = (row.get("test_vs_start") or {}).get(metric)
            on_test = (
                f" On test, for reference (the start scored in the same final runs, before training; nothing was "
                f"chosen by it): {against_start_text(against)}."
                if against
                else ""
            )
            lines.append(
                f"{regime} trained past its linear-probe start: selection {label} {score:.3f} at the chosen epoch "
                f"against its start's {start:.3f} on the same held-out images ({(score - start) * 100:+.1f} points, "
                f"paired SE {se * 100:.1f}: {clear} one SE).{on_test}"
            )
    if verdict["best_on_test"] != winner:
        lines.append(
            f"On the test split **{verdict['best_on_test']}** scores highest; the winner is chosen on labelled "
            f"training data only, as a user without test labels would, and the paired intervals above say whether "
            f"that gap is real."
        )
    if verdict["cheaper"]:
        gaps = ", ".join(f"{c['regime']} ({-c['score_gap'] * 100:+.1f} points)" for c in verdict["cheaper"])
        lines.append(f"Cheaper than the winner but more than one standard error below it on selection: {gaps}.")
    for g in verdict.get("selection_test_gaps") or []:
        lines.append(selection_test_gap_text(g, rows[g["regime"]].get("selection"), label))
    return "\n".join(lines)


def selection_test_gap_text(gap: dict, selection: dict | None, label: str) -> str:
    """A regime whose test score lies outside its selection score's interval, with the causes that direction
    allows: a test score above selection is what fold models trained on part of the pool predict for a regime still
    gaining from more images; one below it, a test split unlike the pool (or a sweep's best flattered by its folds)."""
    sel = selection or {}
    scores = (
        f"{gap['regime']}'s selection {label} {gap['selection']:.3f} and test {label} {gap['test']:.3f} differ by "
        f"more than their combined 95% intervals (±{gap['bound']:.3f})"
    )
    if gap["gap"] < 0:
        if sel.get("protocol") == "cv":
            k = sel["folds"]
            fewer = (
                f"each selection model trained on {k - 1}/{k} of the labelled pool ({k}-fold cross-validation), "
                "the final runs on all of it"
            )
        else:
            fewer = "the selection models trained without the validation split, the final runs with it"
        return (
            f"Note: {scores}; test is higher: {fewer}, so a regime still gaining from "
            f"more images scores better than its selection {label} says (or the test split is easier than the pool)."
        )
    n = sel.get("n_candidates") or len(sel.get("candidates") or [])
    flattered = f", or the best of its {n} candidates scored above its worth on the same folds" if n > 1 else ""
    return (
        f"Warning: {scores}; test is lower: the test split differs from the labelled pool in a way selection on "
        f"training data cannot see{flattered}."
    )


def chosen_candidate(selection: dict | None) -> dict | None:
    """The selection's candidate whose overrides it chose, if it recorded its candidates."""
    chosen = ((selection or {}).get("settings") or {}).get("overrides")
    return next((c for c in (selection or {}).get("candidates") or [] if c.get("overrides") == chosen), None)


def gain_over_start(selection: dict | None, metric: str) -> tuple[float, float, float] | None:
    """``(score, start's score, paired SE of the difference)`` in ``metric`` of the chosen candidate on its own folds,
    or None where the selection scored no start (a frozen head, no cross-validation)."""
    c = chosen_candidate(selection) or {}
    start = (c.get("start_scores") or {}).get(metric)
    if start is None:
        return None
    return (c.get("scores") or {}).get(metric, c["score"]), start, (c.get("gain_se") or {}).get(metric, 0.0)


def score_text(sel: dict) -> str:
    return "no score" if sel["score"] is None else f"{sel['score']:.3f} ± {sel['se']:.3f}"


def protocol_text(selection: dict | None, seeds: int, shots: str = "all") -> str:
    """How a regime's selection score was computed, for the verdict and the tables."""
    protocol = (selection or {}).get("protocol") or "validation"
    if protocol == "cv":
        pool = "train + validation" if shots == "all" else f"the first seed's {shots} labelled images per class"
        return f"pooled out-of-fold, {selection['folds']}-fold cross-validation over {pool}, once for all seeds"
    if protocol == "none":
        return "no selection: a class has a single labelled image"
    return "the given validation split, once for all seeds; the final runs retrain on train + validation"


def selection_cell(row: dict) -> str:
    """Selection accuracy ± its binomial standard error over the images scored, and how it was scored."""
    if not row["val"]:
        return "–"
    sel = selection_score(row, "acc")
    n = len((row.get("selection") or {}).get("candidates") or [])
    best_of = f", best of {n}" if n > 1 else ""
    return f"{sel['score']:.3f} ± {sel['se']:.3f} ({protocol_short(row.get('selection'))}{best_of})"


def protocol_short(selection: dict | None) -> str:
    protocol = (selection or {}).get("protocol") or "validation"
    return f"{selection['folds']}-fold CV" if protocol == "cv" else protocol


def chosen_text(selection: dict | None) -> str:
    """The chosen candidate of a regime's sweep, and the epoch chosen of the planned schedule."""
    if not selection:
        return "–"
    settings = selection.get("settings") or {}
    overrides = " ".join(settings.get("overrides") or []) or "configured"
    n = len(selection.get("candidates") or [])
    epochs, horizon = settings.get("epochs"), settings.get("horizon")
    at = f"; epoch {epochs} of {horizon}" if epochs is not None else ""
    return f"{overrides}{f' (of {n})' if n > 1 else ''}{at}"


def fmt_interval(s: dict | None) -> str:
    return f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" if s else "–"


def fmt_summary(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{s['ci95'][0]:.{digits}f}, {s['ci95'][1]:.{digits}f}]"


def regime_table(summary: dict, shots: str) -> list[list[str]]:
    header = [
        "regime",
        *(f"test {METRIC_LABELS[m]}" for m in METRIC_LABELS),
        "test accuracy, 95% CI over test images",
        "selection accuracy",
        "images scored",
        "chosen (of the sweep)",
        "trainable params",
        "train time (s)",
        "cost (s)",
        "selection (s)",
        "s / epoch",
        "epochs trained",
        "image size",
        "peak memory (MB)",
        "test accuracy against its start",
        "kept start",
    ]
    rows = [header]
    for regime, by in summary.items():
        if shots not in by:
            continue
        s = by[shots]
        rows.append(
            [
                regime,
                *(fmt_summary(s["test"][m]) for m in METRIC_LABELS),
                fmt_interval(s.get("test_bootstrap", {}).get("acc")),
                selection_cell(s),
                str(s.get("n_scored") or "–"),
                chosen_text(s.get("selection")),
                f"{s['trainable_params']:,}",
                f"{s['train_seconds']['mean']:.1f} ± {s['train_seconds']['std']:.1f}",
                f"{s['cost_seconds']:.1f}",
                f"{s.get('selection_seconds', 0.0):.0f}",
                f"{s['seconds_per_epoch']['mean']:.2f}",
                f"{s['epochs']['mean']:.0f}",
                f"{s['image_size'][-1]} px",
                f"{s['peak_memory_bytes']['mean'] / 2**20:.0f} ({MEMORY_KINDS.get(s['peak_memory_kind'], '?')})",
                against_start_cell(s.get("test_vs_start")),
                f"{s.get('kept_start', 0)}/{len(s['seeds'])}",
            ]
        )
    return rows


def against_start_text(against: dict) -> str:
    """A final model's test score against its own start's (``test_vs_start``'s entry for one metric), in points."""
    lo, hi = against["ci95"]
    return (
        f"{against['final']:.3f} against its start's {against['start']:.3f}, {against['diff'] * 100:+.1f} points "
        f"(95% interval {lo * 100:+.1f} to {hi * 100:+.1f})"
    )


def against_start_cell(against: dict | None) -> str:
    """The regime table's cell: test accuracy minus the start's, with its paired interval, or – (no start scored)."""
    if not against or "acc" not in against:
        return "–"
    a = against["acc"]
    return f"{a['diff'] * 100:+.1f} [{a['ci95'][0] * 100:+.1f}, {a['ci95'][1] * 100:+.1f}] (start {a['start']:.3f})"


KEPT_START_NOTE = (
    "kept start: final runs that trained 0 epochs because the pooled out-of-fold validation loss was lowest at the "
    f"start (for {', '.join(STARTS_AS_PROBE)} a linear probe on the frozen pre-logits: such a run is that probe). "
    "selection accuracy: pooled out-of-fold accuracy at the chosen epoch ± its binomial SE (best of N: the regime's "
    "sweep had N candidates); the test split scores each final run's model once. test accuracy against its start: "
    "where a final run trained from a probe, that probe was scored on test too, before training (a reference, never "
    "used to choose): the final model's accuracy minus its start's in points, paired over seeds and test images, "
    "95% interval. cost: per final run, extraction of the levels and image size the model reads + probe fit + "
    "training; selection: every selection run, not in the cost."
)


def shots_table(summary: dict) -> list[list[str]]:
    keys = sorted({k for by in summary.values() for k in by}, key=lambda k: float("inf") if k == "all" else int(k))
    rows = [["regime", *(f"{k} / class" for k in keys)]]
    for regime, by in summary.items():
        rows.append(
            [
                regime,
                *(
                    f"{by[k]['test']['acc']['mean']:.3f} ± {by[k]['test']['acc']['std']:.3f}" if k in by else "–"
                    for k in keys
                ),
            ]
        )
    return rows


def per_class_table(results: dict) -> list[list[str]] | None:
    """The winner's precision, recall and F1 per class on the test split (mean over its seeds), with support."""
    v = results["verdict"]
    runs = [
        r["test"]["per_class"]
        for r in results["runs"]
        if r["regime"] == v["winner"] and r["shots_per_class"] == v["shots"] and r["test"].get("per_class")
    ]
    if not runs:
        return None
    rows = [["class", "precision", "recall", "F1", "support"]]
    for name in results["class_names"]:
        mean = {k: sum(r[name][k] for r in runs) / len(runs) for k in ("precision", "recall", "f1")}
        rows.append([name, *(f"{mean[k]:.3f}" for k in ("precision", "recall", "f1")), str(runs[0][name]["support"])])
    return rows


def sweep_table(results: dict, shots: str) -> list[list[str]] | None:
    """Every candidate of each regime's sweep (regimes with more than one), scored on the same folds: its selection
    score, epoch, and paired difference from the chosen candidate on the same images (± paired SE); a candidate a
    race dropped, its score, epoch and paired difference from the best on the first fold."""
    rows = [["regime", "candidate", "selection score", "epoch", "vs chosen (paired, ± SE)"]]
    seen = set()
    for r in results["runs"]:
        sel = r.get("selection") or {}
        candidates = sel.get("candidates") or []
        if r["shots_per_class"] != shots or r["regime"] in seen or len(candidates) < 2:
            continue
        seen.add(r["regime"])
        chosen = (sel.get("settings") or {}).get("overrides")
        for c in candidates:
            name = " ".join(c["overrides"]) or "configured"
            if c.get("dropped"):
                d = c["dropped"]
                score = f"dropped after fold 1 ({d['score']:.3f} there)"
                rows.append([r["regime"], name, score, str(d["epoch"]), f"fold 1: {d['diff']:+.3f} ± {d['se']:.3f}"])
                continue
            vs = c.get("vs_chosen")
            versus = "chosen" if c["overrides"] == chosen else (f"{vs['diff']:+.3f} ± {vs['se']:.3f}" if vs else "–")
            rows.append([r["regime"], name, f"{c['score']:.3f}", str(c["epoch"]), versus])
    return rows if len(rows) > 1 else None


def kept_features_table(results: dict, shots: str) -> list[list[str]] | None:
    """What a selecting head (Head2Toe's) kept in the final runs: per input group (level and grid), the features
    kept of its total in each seed's run, and per grid cell (seed of the first run)."""
    runs = [
        r for r in results["runs"] if r["shots_per_class"] == shots and (r.get("head") or {}).get("kept") is not None
    ]
    if not runs:
        return None
    groups = list((runs[0]["head"].get("inputs") or {}) or runs[0]["head"]["kept"])
    rows = [["level @ grid", *(f"kept, seed {r['seed']}" for r in runs), f"per cell, seed {runs[0]['seed']}"]]
    for group in groups:
        counts = [r["head"]["kept"].get(group) for r in runs]
        if not any(counts):
            continue
        size = next(c["of"] for c in counts if c)
        cells = counts[0]["cells"] if counts[0] and len(counts[0]["cells"]) > 1 else []
        rows.append([group, *(f"{c['features'] if c else 0} of {size}" for c in counts), " ".join(map(str, cells))])
    return rows


def auto_rgn_table(results: dict, shots: str) -> list[list[str]] | None:
    """Auto-RGN's mean learning-rate multiplier of each block's tensors, per seed's final run (1: the tensors the
    data pulled at hardest; the blocks surgical fine-tuning would pick)."""
    runs = [r for r in results["runs"] if r["shots_per_class"] == shots and (r.get("tuned") or {}).get("auto_rgn")]
    if not runs:
        return None
    rows = [["block", *(f"{r['regime']}, seed {r['seed']}" for r in runs)]]
    for block in runs[0]["tuned"]["auto_rgn"]:
        rows.append([block, *(f"{(r['tuned']['auto_rgn'].get(block) or 0.0):.3f}" for r in runs)])
    return rows


def selection_curves(results: dict, shots: str) -> dict[str, dict]:
    """Each regime's pooled out-of-fold validation loss by epoch for its chosen candidate (what chose its epoch)."""
    out = {}
    for r in results["runs"]:
        if r["shots_per_class"] != shots or r["regime"] in out:
            continue
        cand = chosen_candidate(r.get("selection"))
        if cand and cand.get("loss_by_epoch"):
            out[r["regime"]] = {"loss": cand["loss_by_epoch"], "chosen": cand["epoch"], "horizon": cand["horizon"]}
    return out


def figures(results: dict) -> dict[str, tuple[str, bytes]]:
    """name -> (caption, PNG) for every figure the data supports."""
    shots = results["verdict"]["shots"]
    winner = results["verdict"]["winner"]
    out = {}
    curves = selection_curves(results, shots)
    if curves:
        out["learning_curves"] = (
            f"Learning curves ({shots} shots): each regime's validation loss on its pooled out-of-fold predictions "
            "(the chosen setting) at every validated epoch, 0 being the start; the dashed line is the chosen epoch, "
            "which the final runs train on the folds' schedule",
            plots.learning_curves({r: curves[r] for r in results["summary"] if r in curves}),
        )
    confusion = [
        r["test_confusion"]
        for r in results["runs"]
        if r["regime"] == winner and r["shots_per_class"] == shots and r["test_confusion"]
    ]
    if confusion:
        total = [[sum(m[i][j] for m in confusion) for j in range(len(confusion[0]))] for i in range(len(confusion[0]))]
        out["confusion"] = (
            f"Test confusion matrix of the winner ({winner}), summed over {len(confusion)} seeds",
            plots.confusion_matrix(total, results["class_names"], f"{winner}: test split"),
        )
    if len({r["shots_per_class"] for r in results["runs"]}) > 1:
        out["shots"] = (
            "Test accuracy against training images per class (mean ± std over seeds)",
            plots.accuracy_vs_shots(results["summary"]),
        )
    depth = results.get("transfer_by_depth")
    if depth:
        out["depth"] = (
            f"Transfer by depth: linear probe on each cached level, fitted on {depth.get('fit_on', 'train')}, scored "
            f"{depth['split']}" + (f" ({depth['n_scored']} images)" if depth.get("n_scored") else ""),
            plots.depth_curve(depth["accuracy"], depth["split"]),
        )
    return out


def _md_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_inline(text: str) -> str:
    """The verdict's **bold** and list markers as HTML."""
    out = []
    for line in text.splitlines():
        parts = line.split("**")
        s = "".join(f"<b>{html.escape(p)}</b>" if i % 2 else html.escape(p) for i, p in enumerate(parts))
        out.append(f"<li>{s[2:]}</li>" if line.startswith("- ") else f"<p>{s}</p>")
    return "\n".join(out).replace("</p>\n<li>", "</p>\n<ul><li>", 1).replace("</li>\n<p>", "</li></ul>\n<p>") + (
        "</ul>" if out and out[-1].startswith("<li>") else ""
    )


def not_run_text(not_run: list[dict]) -> str:
    """Which planned runs the time budget (``compare.time_budget_s``) left out, so a shorter table is explained."""
    if not not_run:
        return ""
    runs = ", ".join(f"{r['regime']} (shots {r['shots_per_class']}, seed {r['seed']})" for r in not_run)
    return f" **Not run** ({len(not_run)} planned runs, compare.time_budget_s spent): {runs}."


def leakage_text(leakage: dict | None) -> str:
    """What the leakage check found before training, and what ``data.dedupe`` did about it."""
    if leakage is None:
        return "Leakage check: off (data.leakage.check=false)."
    found = f"{leakage['exact']} exact and {leakage['near']} near-duplicate pairs"
    if not leakage["exact"] and not leakage["near"]:
        return "Leakage check: no held-out image is a copy of a training or validation image."
    dropped = ", ".join(f"{n} {split}" for split, n in leakage["dropped"].items())
    action = f"dropped {dropped} image(s)" if dropped else "kept (the numbers include them)"
    return (
        f"**Leakage check: {found}** between held-out and training/validation images (exact: same file; near: "
        f"thumbnail correlation >= {leakage['threshold']}); data.dedupe={leakage['dedupe']}: {action}; the pairs are "
        f"in each run's {leakage['pairs']}."
    )


def what_ran(results: dict) -> str:
    """Per regime and shots setting, what its final runs actually were (from the runs, not the preset)."""
    models = results["verdict"].get("models") or {}
    parts = []
    for regime, by in results["summary"].items():
        for shots, row in by.items():
            if shots != results["verdict"]["shots"]:
                continue
            what = models.get(regime, {}).get("is") or regime
            sel = (row.get("selection") or {}).get("settings") or {}
            schedule = f", epoch {sel['epochs']} of a {sel['horizon']}-epoch schedule" if sel.get("horizon") else ""
            parts.append(f"{regime}: {what}{schedule}")
    return "What ran: " + "; ".join(parts) + "." if parts else ""


def sections(results: dict) -> list[tuple[str, str]]:
    """(title, markdown body) pairs shared by both renderings (tables are added per format)."""
    env = results["environment"]
    overrides = results.get("user_overrides") or []
    folds = sorted({(r.get("selection") or {}).get("folds") for r in results["runs"]} - {None, 0})
    return [
        (
            "Setup",
            f"Dataset `{results['dataset']}`, backbone `{results['backbone']}`, preset **{results['preset']}**: "
            f"{results['preset_note']} "
            + (f"Your overrides (they win over the sweep): `{' '.join(overrides)}`. " if overrides else "")
            + f"{what_ran(results)} "
            f"Same splits for every run (split seed fixed); seeds {sorted({r['seed'] for r in results['runs']})}. "
            f"One protocol for every regime, chosen on labelled data only, once per shots setting: the same "
            f"stratified, group-aware folds ({', '.join(map(str, folds)) or 'none'}) over train + validation (under "
            f"k-shot only the k shots per class; copies of one image stay in one fold; a given validation split of "
            f"compare.selection.min_scored images or more is the one fold); each candidate's epoch is the lowest "
            f"pooled out-of-fold validation loss (0: the start), its score the pooled out-of-fold "
            f"{results['verdict']['metric']} there; every seed's final run retrains on the pool for that epoch on the "
            f"folds' schedule and scores the test split once with its model (one that trains from a probe also "
            f"scores that probe there first, before training: a reference nothing is chosen by). Numbers are mean ± "
            f"std [95% CI] over seeds, except "
            f"where the 95% interval is over seeds and test images (two-level bootstrap). "
            + (leakage_text(results["runs"][0]["leakage"]) if "leakage" in results["runs"][0] else "")
            + not_run_text(results.get("not_run", [])),
        ),
        ("Environment", ", ".join(f"{k}: {v}" for k, v in env.items())),
    ]


def optional_tables(results: dict, shots: str) -> list[tuple[str, list[list[str]]]]:
    """(title, rows) of the tables the results support: the winner's per-class scores, the sweeps' candidates,
    the features a selecting head kept, the blocks Auto-RGN trained fastest."""
    tables = [
        (f"Per class: {results['verdict']['winner']} (test split, mean over seeds)", per_class_table(results)),
        (
            f"Sweeps ({shots} shots): every candidate on the same folds (or dropped by the race)",
            sweep_table(results, shots),
        ),
        (f"Features the selective head kept ({shots} shots, final runs)", kept_features_table(results, shots)),
        (
            f"Auto-RGN's mean learning-rate multiplier by block ({shots} shots, final runs)",
            auto_rgn_table(results, shots),
        ),
    ]
    return [(title, rows) for title, rows in tables if rows]


def write_report(results: dict, report_dir: Path) -> None:
    """Write ``report.md`` + ``figures/*.png`` and a standalone ``report.html``."""
    shots = results["verdict"]["shots"]
    verdict = verdict_text(results["verdict"], results["summary"])
    figs = figures(results)
    fig_dir = report_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    for name, (_, png) in figs.items():
        (fig_dir / f"{name}.png").write_bytes(png)
    setup, env = sections(results)
    title = f"Regime comparison: {results['name']}"
    table_title = f"Regimes ({'all training images' if shots == 'all' else f'{shots} images per class'}, test split)"

    md = [
        f"# {title}",
        "",
        "## Verdict",
        "",
        verdict,
        "",
        f"## {setup[0]}",
        "",
        setup[1],
        "",
        f"## {table_title}",
        "",
        _md_table(regime_table(results["summary"], shots)),
        "",
        KEPT_START_NOTE,
        "",
        "## Test accuracy by shots per class",
        "",
        _md_table(shots_table(results["summary"])),
        "",
    ]
    extra = optional_tables(results, shots)
    for extra_title, rows in extra:
        md += [f"## {extra_title}", "", _md_table(rows), ""]
    for name, (caption, _) in figs.items():
        md += [f"### {caption}", "", f"![{caption}](figures/{name}.png)", ""]
    md += [f"## {env[0]}", "", env[1], "", "Every number above is in `results.json`.", ""]
    (report_dir / "report.md").write_text("\n".join(md))

    imgs = "".join(
        f"<h3>{html.escape(c)}</h3><img alt='{html.escape(c)}' src='data:image/png;base64,"
        f"{base64.b64encode(png).decode()}'/>"
        for c, png in figs.values()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;font-size:13px;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
th{{background:#f3f3f3}}img{{max-width:100%;border:1px solid #eee}}code{{background:#f3f3f3}}</style></head><body>
<h1>{html.escape(title)}</h1><h2>Verdict</h2>{_md_inline(verdict)}
<h2>{setup[0]}</h2>{_md_inline(setup[1])}
<h2>{html.escape(table_title)}</h2>{_html_table(regime_table(results["summary"], shots))}
<p>{html.escape(KEPT_START_NOTE)}</p>
<h2>Test accuracy by shots per class</h2>{_html_table(shots_table(results["summary"]))}
{"".join(f"<h2>{html.escape(t)}</h2>{_html_table(rows)}" for t, rows in extra)}
{imgs}<h2>{env[0]}</h2><p>{html.escape(env[1])}</p><p>Every number above is in results.json.</p></body></html>"""
    (report_dir / "report.html").write_text(page)
