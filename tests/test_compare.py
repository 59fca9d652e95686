"""make compare: regimes x seeds x shots on the same splits, a report whose numbers are results.json's, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fmtransfer.cli.compare import main as compare_main
from fmtransfer.cli.compare import resolve_preset
from fmtransfer.errors import FmtransferError
from fmtransfer.report import schedule as schedule_mod
from fmtransfer.report.compare import selection_test_gaps
from fmtransfer.report.render import verdict_text
from fmtransfer.report.stats import summarise
from fmtransfer.report.verdict import model_description, selection_score, verdict

TINY = [
    "data.image_size=32",
    "compare.preset=cpu",
    "compare.seeds=[0,1]",
    "compare.shots=[3,6]",
    "head.epochs=5",
    "regimes.partial.epochs=2",
    "regimes.partial.views=2",  # cached augmented views: 2 keep the test short (default 8)
    "regimes.finetune.epochs=1",
    "regimes.finetune.image_size=32",
    "regimes.scratch.epochs=1",
    "regimes.scratch.image_size=32",
    "head.min_steps=20",
    "regimes.partial.min_steps=2",
    "regimes.finetune.min_steps=2",
    "regimes.scratch.min_steps=2",
    "trainer.progress_bar=false",
    # Selection: 2 folds of the k shots per regime, one candidate each (test_selection covers sweeps): frozen Head2Toe's
    # selection head, whose kept features the report tables; finetune the first of the CPU preset's two rates.
    "compare.sweep.frozen=[['head.name=selective']]",
    "compare.sweep.finetune=[['regime.backbone_lr=0.00001']]",
    "compare.selection.folds=2",
]
FOLD_RUNS = 2 * 4 * 2  # shots settings x regimes x folds


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    overrides = [*TINY, f"paths.data_dir={tmp / 'data'}", f"paths.log_dir={tmp / 'logs'}"]
    return overrides, tmp


def test_comparison_report_matches_results_and_resumes(comparison, capsys, monkeypatch):
    overrides, _ = comparison
    compare_main(overrides)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("report dir: ")
    report_dir = __import__("pathlib").Path(out[-1].removeprefix("report dir: "))
    results = json.loads((report_dir / "results.json").read_text())

    # Every regime x seed x shots ran once, on the same splits.
    runs = results["runs"]
    assert len(runs) == 4 * 2 * 2
    assert {(r["regime"], r["seed"], r["shots_per_class"]) for r in runs} == {
        (g, s, k) for g in ("frozen", "partial", "finetune", "scratch") for s in (0, 1) for k in ("3", "6")
    }
    for r in runs:
        assert set(r["test"]) == {"acc", "f1_macro", "balanced_acc", "per_class"} and r["trainable_params"] > 0
        metrics = json.loads(
            (
                report_dir / "runs" / f"{r['regime']}-shots{r['shots_per_class']}-seed{r['seed']}" / "metrics.json"
            ).read_text()
        )
        # Final runs retrain on the pool (under k-shot: the k shots per class) and test once.
        assert metrics["split_sizes"]["test"] == 359 and metrics["split_sizes"]["train"] == 10 * int(
            r["shots_per_class"]
        )
        assert metrics["val"] is None and metrics["best_checkpoint"].endswith("final.ckpt")
        if r["regime"] == "frozen":  # the selective head's feature selection is part of the model's cost
            assert metrics["head"]["select_seconds"] > 0
            assert metrics["probe_seconds"] == pytest.approx(metrics["head"]["select_seconds"], abs=2e-3)
    frozen_params = {r["trainable_params"] for r in runs if r["regime"] == "frozen"}
    finetune_params = {r["trainable_params"] for r in runs if r["regime"] == "finetune"}
    assert max(frozen_params) < min(finetune_params)

    # The report's numbers are results.json's numbers.
    md = (report_dir / "report.md").read_text()
    shots = results["verdict"]["shots"]
    assert shots == "6"
    for regime, by in results["summary"].items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {regime} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        regime_runs = [r for r in runs if r["regime"] == regime and r["shots_per_class"] == shots]
        # Test metrics: summary cells in the table, summary means from the runs themselves.
        for cell, (split, metric) in zip(
            cells[1:4], [("test", "acc"), ("test", "f1_macro"), ("test", "balanced_acc")], strict=True
        ):
            s = by[shots][split][metric]
            assert cell == f"{s['mean']:.3f} ± {s['std']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"
            assert s["mean"] == pytest.approx(sum(r[split][metric] for r in regime_runs) / len(regime_runs))
        # The interval over test images, from the runs' per-image predictions: same mean as the runs' accuracy.
        boot = by[shots]["test_bootstrap"]["acc"]
        assert boot["mean"] == pytest.approx(by[shots]["test"]["acc"]["mean"], abs=1e-5)  # metrics: 6 decimals
        assert cells[4] == f"{boot['mean']:.3f} [{boot['ci95'][0]:.3f}, {boot['ci95'][1]:.3f}]"
        # The selection score: cross-validated over the 60 pooled shots, once for all seeds.
        sel = by[shots]["val"]["acc"]
        se = selection_score(by[shots], "acc")["se"]
        assert sel["std"] == 0.0 and cells[5] == f"{sel['mean']:.3f} ± {se:.3f} (2-fold CV)"
        assert cells[6] == "60" and cells[8] == f"{by[shots]['trainable_params']:,}"
        kept = sum(r["selected"].startswith("initial") for r in regime_runs)
        assert by[shots]["kept_start"] == kept and cells[-1] == f"{kept}/2"
        a = (by[shots].get("test_vs_start") or {}).get("acc")
        if a:
            lo, hi = (f"{v * 100:+.1f}" for v in a["ci95"])
            assert cells[-2] == f"{a['diff'] * 100:+.1f} [{lo}, {hi}] (start {a['start']:.3f})"
        else:
            assert cells[-2] == "–"
    assert results["verdict"]["winner"] in md.split("## Setup")[0]
    kept = next(r for r in runs if r["regime"] == "frozen" and r["shots_per_class"] == shots)["head"]["kept"]
    table = md.split(f"## Features the selective head kept ({shots} shots, final runs)")[1].split("\n## ")[0]
    for group, count in kept.items():
        assert f"| {group} | {count['features']} of {count['of']} |" in table
    # results.json contract: selection per run; verdict comparisons as a list with paired intervals.
    for r in runs:
        sel = r["selection"]
        assert sel["metric"] == "acc" and sel["protocol"] == "cv" and sel["folds"] == 2
        assert sel["n_scored"] == 10 * int(r["shots_per_class"]), "k-shot: scored on the k shots only"
        assert sel["score"] == r["val"]["acc"] and sel["settings"]["epochs"] is not None
        assert r["epochs"] == sel["settings"]["epochs"], "the final run trains the epochs the folds chose"
    # Fold runs: scored on their fold, the test split left alone, maps gathered from the base cache entries.
    folds = sorted(report_dir.glob("select/*/candidate0-fold*/metrics.json"))
    assert len(folds) == FOLD_RUNS
    for path in folds:
        fold = json.loads(path.read_text())
        assert fold["test"] is None and not (path.parent / "test_predictions.csv").exists()
    v = results["verdict"]
    assert v["metric"] == "acc" and v["shots"] == "6" and v["winner"] in {"frozen", "partial", "finetune", "scratch"}
    assert {c["regime"] for c in v["comparisons"]} == {"frozen", "partial", "finetune", "scratch"} - {v["winner"]}
    for c in v["comparisons"]:
        assert set(c) >= {"regime", "diff", "ci95", "p_value", "p_adjusted", "clear"}
        assert c["clear"] == (c["p_adjusted"] < 0.05) and c["p_adjusted"] >= c["p_value"]
    assert set(v["winner_model"]) == {"regime", "trained_epochs", "is"} and v["winner_model"]["regime"] == v["winner"]
    # Cost counts the build time of the caches a run reads whether it built them or hit them (partial and finetune
    # hit frozen's pre-logits, built by the frozen run before them; scratch reads none).
    for regime, expect_cache in (("frozen", True), ("partial", True), ("finetune", True), ("scratch", False)):
        spent = [r["extract_seconds"] for r in runs if r["regime"] == regime]
        assert (min(spent) > 0) if expect_cache else set(spent) == {0.0}, (regime, spent)
    # Per-class test metrics (torchmetrics), consistent with the run's confusion matrix; shown for the winner.
    for r in runs:
        per_class, confusion = r["test"]["per_class"], r["test_confusion"]
        assert list(per_class) == results["class_names"]
        assert sum(c["support"] for c in per_class.values()) == 359
        for i, c in enumerate(per_class.values()):
            assert c["support"] == sum(confusion[i])
            assert c["recall"] == pytest.approx(confusion[i][i] / sum(confusion[i]), abs=1e-5)
            predicted = sum(row[i] for row in confusion)
            assert c["precision"] == pytest.approx(confusion[i][i] / predicted if predicted else 0.0, abs=1e-5)
    assert f"## Per class: {v['winner']} (test split, mean over seeds)" in md
    # Per-image predictions: one row per test image, same image order and labels in every run.
    import csv

    tables = [list(csv.DictReader(Path(r["test_predictions"]).read_text().splitlines())) for r in runs]
    assert all(len(t) == 359 for t in tables)
    assert all([row["label"] for row in t] == [row["label"] for row in tables[0]] for t in tables)
    for r, t in zip(runs, tables, strict=True):
        assert sum(row["label"] == row["pred"] for row in t) / 359 == pytest.approx(r["test"]["acc"], abs=1e-6)
    # A final run that trained from a probe (partial, finetune) scored that probe on test first, a reference: its own
    # file on the same images; the summary pairs each seed's final model with its start. Frozen heads and scratch
    # start from no probe; a run that kept its start is its start.
    for r in runs:
        from_probe = r["regime"] in ("partial", "finetune") and r["epochs"] > 0
        assert bool(r["start_test_predictions"]) == from_probe == (r["start_test"] is not None), r["regime"]
        if from_probe:
            t = list(csv.DictReader(Path(r["start_test_predictions"]).read_text().splitlines()))
            assert [row["label"] for row in t] == [row["label"] for row in tables[0]]
            assert sum(row["label"] == row["pred"] for row in t) / 359 == pytest.approx(
                r["start_test"]["acc"], abs=1e-6
            )
    against = []
    for regime, by in results["summary"].items():
        for k, s in by.items():
            group = [r for r in runs if r["regime"] == regime and r["shots_per_class"] == k]
            if not all(r["start_test_predictions"] for r in group):
                assert "test_vs_start" not in s
                continue
            a = s["test_vs_start"]["acc"]
            assert a["start"] == pytest.approx(np.mean([r["start_test"]["acc"] for r in group]), abs=1e-5)
            assert a["final"] == pytest.approx(np.mean([r["test"]["acc"] for r in group]), abs=1e-5)
            assert a["diff"] == pytest.approx(a["final"] - a["start"]) and a["ci95"][0] <= a["diff"] <= a["ci95"][1]
            against.append((regime, k))
    assert against, "at least one live regime trained from its probe in this comparison"
    html = (report_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert not re.search(r"src=['\"](?!data:)", html), "the HTML must be standalone"
    assert results["transfer_by_depth"] is None  # no 'all' shots: no frozen run on the full training split
    assert {"device", "torch", "timm", "pytorch_lightning", "git_commit"} <= set(results["environment"])

    # Rerunning finds every run done and trains nothing.
    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was repeated")

    monkeypatch.setattr(schedule_mod, "run_regime", must_not_train)
    compare_main(overrides)
    assert capsys.readouterr().out.count("done earlier") == 16 + FOLD_RUNS


def test_time_budget_skips_runs_and_the_report_says_which(comparison, capsys):
    """compare.time_budget_s: no run starts once the budget (plus the longest run so far) is spent; the report is
    written from the finished runs and names the others. Runs after the first test, so every run is done but one."""
    overrides, _ = comparison
    compare_main(overrides)
    report_dir = __import__("pathlib").Path(
        capsys.readouterr().out.strip().splitlines()[-1].removeprefix("report dir: ")
    )
    (report_dir / "runs" / "scratch-shots3-seed1" / "metrics.json").unlink()
    compare_main([*overrides, "compare.time_budget_s=0"])
    out = capsys.readouterr().out
    assert "scratch, seed 1, shots 3: not run" in out and out.count("done earlier") == 15 + FOLD_RUNS
    results = json.loads((report_dir / "results.json").read_text())
    assert results["not_run"] == [{"regime": "scratch", "seed": 1, "shots_per_class": "3"}]
    assert len(results["runs"]) == 15
    assert (
        "Not run" in (report_dir / "report.md").read_text()
        and "scratch (shots 3, seed 1)" in (report_dir / "report.md").read_text()
    )


def test_time_budget_spent_before_any_run_is_a_clear_error(comparison, capsys):
    overrides, _ = comparison
    with pytest.raises(SystemExit):
        compare_main([*overrides, "compare.seeds=[5]", "compare.regimes=[frozen]", "compare.time_budget_s=0"])
    assert "compare.time_budget_s=0" in capsys.readouterr().err


def _row(val, test, seconds, params=1000, n_val=50, kept=0):
    s = lambda v: summarise(v, bounds=(0.0, 1.0))  # noqa: E731
    return {
        "all": {
            "val": {"acc": s(val)},
            "test": {"acc": s(test)},
            "train_seconds": summarise(seconds),
            "cost_seconds": sum(seconds) / len(seconds),
            "n_scored": n_val,
            "trainable_params": params,
            "seeds": [0, 1, 2],
            "kept_start": kept,
            # A regime every run of which kept its start trained 0 epochs.
            "epochs": summarise([0.0] * 3 if kept == 3 else [5.0] * 3),
            "image_size": [3, 224, 224],
        }
    }


def _preds(labels, n_wrong, seed):
    """Per-seed predictions of a 2-class task with ``n_wrong`` images wrong (which ones varies by seed)."""
    rng = np.random.default_rng(seed)
    preds = labels.copy()
    wrong = rng.choice(len(labels), n_wrong, replace=False)
    preds[wrong] = 1 - preds[wrong]
    return preds


def test_verdict_one_standard_error_rule_and_paired_differences():
    labels = np.array([0, 1] * 100)
    summary = {
        # finetune has the best validation score, frozen is within one SE of it (50 images: SE ~0.036) and 100x
        # cheaper: frozen wins. scratch is far below on validation and on test.
        "frozen": _row([0.90, 0.91, 0.92], [0.93, 0.94, 0.95], [1, 1, 1], 3000),
        "finetune": _row([0.92, 0.93, 0.94], [0.955, 0.96, 0.965], [100, 100, 100], 4_000_000, kept=1),
        "scratch": _row([0.5, 0.52, 0.54], [0.50, 0.52, 0.54], [100, 100, 100], 4_000_000),
    }
    preds = {
        "frozen": np.stack([_preds(labels, 12, s) for s in range(3)]),
        "finetune": np.stack([_preds(labels, 8, s + 10) for s in range(3)]),
        "scratch": np.stack([_preds(labels, 96, s + 20) for s in range(3)]),
    }
    v = verdict(summary, "acc", {"labels": labels, "num_classes": 2, "preds": preds})
    assert v["best_selection"] == "finetune" and v["winner"] == "frozen"
    assert set(v["within_one_se"]) == {"frozen", "finetune"}
    by = {c["regime"]: c for c in v["comparisons"]}
    assert [c["regime"] for c in v["comparisons"]] == ["finetune", "scratch"]  # by test score
    # 4 images of 200 between frozen and finetune: a paired interval that includes 0, so not clear.
    assert by["finetune"]["diff"] == pytest.approx(-0.02) and by["finetune"]["ci95"][0] < 0 < by["finetune"]["ci95"][1]
    assert by["finetune"]["clear"] is False and by["finetune"]["p_value"] > 0.05
    assert by["scratch"]["clear"] is True and by["scratch"]["p_value"] < 0.001
    # Holm over the winner's two comparisons: the smaller p doubled, the larger at least its own.
    assert by["scratch"]["p_adjusted"] == pytest.approx(min(1.0, 2 * by["scratch"]["p_value"]))
    assert by["finetune"]["p_adjusted"] >= by["finetune"]["p_value"]
    assert by["finetune"]["cost_ratio"] == pytest.approx(100.0)
    assert v["kept_start"] == [] and v["cheaper"] == []  # 1 of 3 finetune runs kept its start: not all
    text = verdict_text(v, summary)
    assert "within one standard error" in text
    assert "not a clear difference" in text and "On the test split **finetune** scores highest" in text


def test_a_regime_that_kept_its_start_competes_as_its_start_and_is_named():
    """Every partial run kept its start (a linear probe): it competes with that score and cost, and when it wins the
    verdict says the winner is the start, not a trained backbone."""
    summary = {
        "frozen": _row([0.90] * 3, [0.93] * 3, [5] * 3, 3000),
        "partial": _row([0.95] * 3, [0.94] * 3, [1] * 3, 2_000_000, kept=3),
        "scratch": _row([0.5] * 3, [0.5] * 3, [100] * 3, 4_000_000),
    }
    v = verdict(summary)
    assert v["winner"] == "partial" and v["kept_start"] == ["partial"]
    assert v["winner_model"] == {"regime": "partial", "trained_epochs": 0, "is": "linear probe, pre_logits, 224 px"}
    text = verdict_text(v, summary)
    first = text.splitlines()[0]
    assert not first.startswith("**partial**") and "**partial** wins" not in text, "never crowned under its name"
    assert first.startswith("**A linear probe, pre_logits, 224 px** (the start of partial: 0 epochs trained) wins")
    assert "Fine-tuning did not improve on a linear probe" in text
    summary["frozen"] = _row([0.97] * 3, [0.93] * 3, [5] * 3, 3000, n_val=1000)
    v = verdict(summary)
    text = verdict_text(v, summary)
    assert v["winner"] == "frozen" and "Fine-tuning did not improve" not in text
    assert "partial trained 0 epochs" in text and "(linear probe, pre_logits, 224 px)" in text
    one = _row([0.9] * 3, [0.9] * 3, [5] * 3)["all"] | {"epochs": summarise([1.0] * 3)}
    assert model_description("scratch", one)["is"].endswith("224 px, 1 epoch")
    assert model_description("scratch", _row([0.9] * 3, [0.9] * 3, [5] * 3)["all"])["is"].endswith(", 5 epochs")


def test_a_test_score_outside_its_selection_interval_is_explained_by_its_direction():
    """Test above selection is what fold models trained on part of the pool predict for a regime still gaining from
    more images; test below it, a test split unlike the pool (or a sweep's best flattered). Within the combined
    intervals: no line."""
    summary = {
        "frozen": _row([0.80] * 3, [0.81] * 3, [5] * 3, 3000, n_val=300),
        "partial": _row([0.75] * 3, [0.90] * 3, [1] * 3, 2_000_000, n_val=300),
        "scratch": _row([0.60] * 3, [0.40] * 3, [100] * 3, 4_000_000, n_val=300),
    }
    for row in summary.values():
        row["all"]["test_bootstrap"] = {"acc": row["all"]["test"]["acc"] | {"se": 0.02}}
    summary["partial"]["all"]["selection"] = {"protocol": "cv", "folds": 3, "n_candidates": 1}
    summary["scratch"]["all"]["selection"] = {"protocol": "cv", "folds": 3, "n_candidates": 2}
    v = verdict(summary)
    v["selection_test_gaps"] = selection_test_gaps(summary, v, "acc")
    assert [(g["regime"], round(g["gap"], 2)) for g in v["selection_test_gaps"]] == [
        ("partial", -0.15),
        ("scratch", 0.2),
    ]
    lines = {
        line.split("'")[0].split(" ")[-1]: line
        for line in verdict_text(v, summary).splitlines()
        if "'s selection" in line
    }
    assert set(lines) == {"partial", "scratch"}
    assert lines["partial"].startswith("Note: partial's selection accuracy 0.750 and test accuracy 0.900")
    assert "test is higher: each selection model trained on 2/3 of the labelled pool (3-fold" in lines["partial"]
    assert "test split differs" not in lines["partial"]
    assert (
        lines["scratch"].startswith("Warning: scratch's")
        and "test is lower: the test split differs" in lines["scratch"]
    )
    assert "the best of its 2 candidates" in lines["scratch"]
    summary["scratch"]["all"]["selection"] = {"protocol": "validation", "n_candidates": 1}
    summary["scratch"]["all"]["test_bootstrap"]["acc"]["mean"] = 0.9
    v["selection_test_gaps"] = selection_test_gaps(summary, v, "acc")
    assert "trained without the validation split, the final runs with it" in verdict_text(v, summary)


def test_verdict_says_whether_a_trained_regime_gained_on_its_start():
    """A live regime that trained says how far its chosen candidate's selection score moved from its start's on the
    same held-out images, against the paired SE; a regime that kept its start, or has no scored start, says nothing."""
    summary = {
        "frozen": _row([0.90] * 3, [0.93] * 3, [5] * 3, 3000),
        "finetune": _row([0.92] * 3, [0.94] * 3, [100] * 3, 4_000_000),
        "partial": _row([0.91] * 3, [0.92] * 3, [1] * 3, 2_000_000, kept=3),
    }
    chosen, other = ["regime.backbone_lr=1e-05"], ["regime.backbone_lr=0.0001"]
    summary["finetune"]["all"]["selection"] = {
        "settings": {"overrides": chosen},
        "candidates": [
            {
                "overrides": other,
                "score": 0.80,
                "scores": {"acc": 0.80},
                "start_scores": {"acc": 0.9},
                "gain_se": {"acc": 0.01},
            },
            {
                "overrides": chosen,
                "score": 0.92,
                "scores": {"acc": 0.92},
                "start_scores": {"acc": 0.9},
                "gain_se": {"acc": 0.015},
            },
        ],
    }
    summary["partial"]["all"]["selection"] = {
        "settings": {"overrides": []},
        "candidates": [{"overrides": [], "score": 0.91, "start_scores": {"acc": 0.91}, "gain_se": {"acc": 0.0}}],
    }
    text = verdict_text(verdict(summary), summary)
    assert (
        "finetune trained past its linear-probe start: selection accuracy 0.920 at the chosen epoch against its "
        "start's 0.900 on the same held-out images (+2.0 points, paired SE 1.5: more than one SE)." in text
    )
    assert "On test" not in text  # no start scored on test: nothing said about it
    against = {"start": 0.93, "final": 0.94, "diff": 0.01, "ci95": [-0.005, 0.025], "p_value": 0.2}
    summary["finetune"]["all"]["test_vs_start"] = {"acc": against}
    assert (
        "(+2.0 points, paired SE 1.5: more than one SE). On test, for reference (the start scored in the same final "
        "runs, before training; nothing was chosen by it): 0.940 against its start's 0.930, +1.0 points (95% interval "
        "-0.5 to +2.5)." in verdict_text(verdict(summary), summary)
    )
    assert "partial trained past" not in text and "frozen trained past" not in text
    summary["finetune"]["all"]["selection"]["candidates"][1]["gain_se"] = {"acc": 0.03}
    assert "(+2.0 points, paired SE 3.0: within one SE)" in verdict_text(verdict(summary), summary)


def test_verdict_without_predictions_never_calls_a_difference_clear():
    summary = {"frozen": _row([0.9] * 3, [0.95] * 3, [1] * 3), "scratch": _row([0.5] * 3, [0.5] * 3, [9] * 3)}
    v = verdict(summary)
    assert v["winner"] == "frozen" and v["comparisons"][0]["ci95"] is None and v["comparisons"][0]["clear"] is False


def test_cheaper_lists_only_regimes_below_the_winner_on_selection():
    summary = {
        "frozen": _row([0.7] * 3, [0.7] * 3, [1] * 3, n_val=1000),
        "finetune": _row([0.9] * 3, [0.9] * 3, [9] * 3),
    }
    v = verdict(summary)
    assert v["winner"] == "finetune"
    assert v["cheaper"] == [{"regime": "frozen", "cost_ratio": pytest.approx(1 / 9), "score_gap": pytest.approx(0.2)}]
    assert "frozen (-20.0 points)" in verdict_text(v, summary)


def test_summary_statistics():
    s = summarise([0.8, 0.9, 1.0])
    assert s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1)
    assert s["ci95"][0] == pytest.approx(0.9 - 4.302653 * 0.1 / 3**0.5, rel=1e-5)
    assert summarise([0.8, 0.9, 1.0], bounds=(0, 1))["ci95"][1] == 1.0
    assert summarise([0.5]) == {"mean": 0.5, "std": 0.0, "ci95": [0.5, 0.5], "n": 1}


def test_without_a_gpu_the_cpu_preset_is_chosen_and_said(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = resolve_preset(["experiment=hymenoptera"])
    assert cfg.compare.preset == "cpu" and "CPU preset" in cfg.compare.preset_note
    assert "using the CPU preset" in capsys.readouterr().out
    assert resolve_preset(["compare.preset=full"]).trainer.precision == "bf16-mixed"


def test_a_comparison_is_named_after_its_data():
    assert resolve_preset([]).compare.name == "digits"
    assert resolve_preset(["data.path=/data/my_cells/"]).compare.name == "my_cells"
    assert resolve_preset(["experiment=hymenoptera"]).compare.name == "hymenoptera"


def test_an_unknown_compare_metric_is_refused_before_any_run():
    with pytest.raises(FmtransferError, match=r"compare\.metric=auc is not known"):
        resolve_preset(["compare.metric=auc"])
    assert resolve_preset(["compare.metric=balanced_acc"]).compare.metric == "balanced_acc"
    with pytest.raises(FmtransferError, match=r"compare\.selection\.race has \['finetun'\]"):
        resolve_preset(["compare.selection.race=[finetun]"])
    with pytest.raises(FmtransferError, match=r"compare\.selection\.race_se=-1\.0 must be a number"):
        resolve_preset(["compare.selection.race_se=-1.0"])


def test_an_experiments_cpu_preset_keeps_the_cpu_selection():
    """Experiments replace the CPU preset's list with their own sizes; the CPU selection (every regime on 3 folds,
    live regimes one setting but finetune's two backbone rates) comes from compare.selection_presets and survives
    that."""
    for experiment in ("hymenoptera", "uiuc_texture", "pneumoniamnist"):
        cfg = resolve_preset([f"experiment={experiment}", "compare.preset=cpu"])
        assert cfg.compare.selection.folds == 3 and "folds" not in cfg.compare, "one fold count for every regime"
        assert all(len(cfg.compare.sweep[r]) == 1 for r in ("partial", "scratch")), experiment
        rates = [
            [float(o.split("=")[1]) for o in c if o.startswith("regime.backbone_lr=")]
            for c in cfg.compare.sweep.finetune
        ]
        assert rates == [[1e-5], [1e-4]], experiment
        assert len(cfg.compare.sweep.frozen) == 5, "frozen keeps its sweep: linear, multilayer, 3 selective"
    full = resolve_preset(["experiment=uiuc_texture", "compare.preset=full"])
    assert all(len(full.compare.sweep[r]) == 2 for r in ("partial", "finetune", "scratch"))
    assert len(full.compare.sweep.frozen) == 5


def test_parameter_efficient_regimes_train_on_finetune_s_budget_unless_set():
    """compare.budget_of: bitfit, lora and surgical take finetune's epochs, steps and image size in every preset (an
    experiment's CPU sizes included); a user's own setting wins; the CPU preset runs each one candidate."""
    budget = ("epochs", "min_steps", "image_size")
    for experiment in ("hymenoptera", "pneumoniamnist"):
        cfg = resolve_preset([f"experiment={experiment}", "compare.preset=cpu", "regimes.lora.epochs=9"])
        finetune = [cfg.regimes.finetune[k] for k in budget]
        assert [cfg.regimes.bitfit[k] for k in budget] == [cfg.regimes.surgical[k] for k in budget] == finetune
        assert cfg.regimes.lora.epochs == 9 and cfg.regimes.lora.image_size == cfg.regimes.finetune.image_size
        assert all(len(cfg.compare.sweep[r]) == 1 for r in ("bitfit", "lora", "surgical"))
    assert resolve_preset([]).compare.regimes == ["frozen", "partial", "finetune", "scratch"]
    with pytest.raises(FmtransferError, match=r"compare\.budget_of: lora: nothing"):
        resolve_preset(["compare.budget_of.lora=nothing"])


def test_a_users_override_wins_over_the_sweep_and_is_listed():
    """``regimes.partial.k=2`` on the command line: the sweep no longer sets regime.k (k=2 runs), the Setup lists it;
    an experiment's own settings are not "the user's"."""
    cfg = resolve_preset(["experiment=hymenoptera", "compare.preset=full", "regimes.partial.k=2", "head.lr=0.05"])
    assert cfg.regimes.partial.k == 2
    assert [list(c) for c in cfg.compare.sweep.partial] == [[]], "both k candidates collapse to the user's k"
    assert all(not any(str(o).startswith("head.lr=") for o in c) for c in cfg.compare.sweep.frozen)
    assert len(cfg.compare.sweep.frozen) == 5 and len(cfg.compare.sweep.finetune) == 2
    assert list(cfg.compare.user_overrides) == ["regimes.partial.k=2", "head.lr=0.05"]
    assert list(resolve_preset(["experiment=hymenoptera"]).compare.user_overrides) == []
    # A candidate that sets a whole dict (the selective head's options) gives way to a user's key inside it.
    inside = resolve_preset(["experiment=hymenoptera", "+head.options.fraction=0.2"])
    assert not any(str(o).startswith("head.options") for c in inside.compare.sweep.frozen for o in c)
    assert inside.head.options.fraction == 0.2


def test_runs_side_by_side_in_worker_processes_give_the_same_results(tmp_path, capsys):
    """compare.workers=2: the groups at once, their runs in two worker processes; every number as one at a time."""
    small = [
        *TINY,
        "compare.regimes=[frozen,finetune]",
        "compare.seeds=[0]",
        "compare.shots=[3]",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    results = {}
    for workers in (1, 2):
        compare_main([*small, f"compare.workers={workers}", f"compare.out_dir={tmp_path / f'w{workers}'}"])
        report_dir = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("report dir: "))
        results[workers] = json.loads((report_dir / "results.json").read_text())
    one, two = ({(r["regime"], r["seed"]): r for r in results[w]["runs"]} for w in (1, 2))
    assert one.keys() == two.keys() == {("frozen", 0), ("finetune", 0)}
    for key, run in one.items():
        assert run["run_dir"] != two[key]["run_dir"]
        assert run["selection"]["settings"] == two[key]["selection"]["settings"]
        losses = [c["loss_by_epoch"] for c in run["selection"]["candidates"]]
        assert losses == [pytest.approx(c["loss_by_epoch"], abs=1e-5) for c in two[key]["selection"]["candidates"]]
        assert run["selection"]["score"] == pytest.approx(two[key]["selection"]["score"], abs=1e-9)
        assert run["test"]["acc"] == pytest.approx(two[key]["test"]["acc"], abs=1e-9)
        a, b = (np.loadtxt(r["test_predictions"], delimiter=",", skiprows=1, usecols=(3, 4)) for r in (run, two[key]))
        np.testing.assert_allclose(a, b, atol=1e-5)  # one thread per worker against two: float summation order only


def test_a_scheduled_run_frees_its_trainer_and_data_when_it_ends(tmp_path, tiny_overrides):
    """A comparison runs ~100 fits in one process: each run's Trainer, with its datamodule, model and features (they
    hold each other in reference cycles), is freed when the run ends, not whenever the cycle collector next runs."""
    import gc

    import pytorch_lightning as pl

    from fmtransfer.cli.config import compose_config

    def trainers() -> set[int]:
        return {id(o) for o in gc.get_objects() if isinstance(o, pl.Trainer)}

    cfg = compose_config([*tiny_overrides, "head=linear"])
    gc.collect()
    before = trainers()
    gc.disable()  # only the scheduler's own collection may free the run
    try:
        with schedule_mod.RunScheduler(None) as runner:
            metrics = runner.submit("tiny", cfg, tmp_path / "run").result()
        left = trainers() - before
    finally:
        gc.enable()
    assert metrics["test"] is not None and not left


def test_run_slots_bound_the_runs_at_once_and_a_dead_holder_frees_its_slot(tmp_path, monkeypatch):
    """The GPU kit's comparisons (separate processes) share the device's run slots: never more runs at once than
    slots, and a process that dies holding one (killed, crashed) leaves it free."""
    import subprocess
    import sys
    import threading
    import time

    slots = schedule_mod.RunSlots(tmp_path / "slots", 2, poll_s=0.01)
    now, most, guard = [0], [0], threading.Lock()

    def one_run():
        with slots.held():
            with guard:
                now[0] += 1
                most[0] = max(most[0], now[0])
            time.sleep(0.05)
            with guard:
                now[0] -= 1

    runs = [threading.Thread(target=one_run) for _ in range(6)]
    for t in runs:
        t.start()
    for t in runs:
        t.join(timeout=10)
    assert most[0] == 2 and now[0] == 0

    single = schedule_mod.RunSlots(tmp_path / "single", 1, poll_s=0.01)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\ntime.sleep(60)", str(tmp_path / "single" / "slot0")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        waiting = threading.Thread(target=lambda: single.held().__enter__())
        waiting.start()
        waiting.join(timeout=0.3)
        assert waiting.is_alive(), "the slot was taken while another process held it"
    finally:
        holder.kill()
        holder.wait()
    waiting.join(timeout=5)
    assert not waiting.is_alive(), "a killed process's slot stayed taken"

    monkeypatch.setenv(schedule_mod.RUN_SLOTS_ENV, f"{tmp_path / 'env'}:3")
    assert schedule_mod.RunSlots.from_env().count == 3
    monkeypatch.setenv(schedule_mod.RUN_SLOTS_ENV, "3")
    with pytest.raises(FmtransferError, match="<folder>:<count>"):
        schedule_mod.RunSlots.from_env()
