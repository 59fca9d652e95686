"""``make compare``: run every planned run (``runs``), decide (``verdict``), render the report (``render``)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fmtransfer.errors import ConfigError
from fmtransfer.report.environment import describe_environment
from fmtransfer.report.paired import bootstrap_interval, metric_value, paired_difference, read_predictions
from fmtransfer.report.render import write_report
from fmtransfer.report.runs import depth_curve, report_dir_for, run_all, shots_key
from fmtransfer.report.stats import summarise_runs
from fmtransfer.report.verdict import headline_shots, paired_inputs, verdict

log = logging.getLogger(__name__)


def test_predictions(
    records: list[dict], class_names: list[str], field: str = "test_predictions"
) -> tuple[np.ndarray | None, dict]:
    """``(labels, {regime: {shots: [per-seed preds]}})`` from the runs' ``test_predictions.csv`` (``field``: or
    another per-image file of the test split a record names; runs without one, e.g. under DDP, are left out; labels
    are the same for every run, which is checked)."""
    labels, preds = None, {}
    for rec in records:
        if not rec.get(field) or not Path(rec[field]).is_file():
            continue
        run_labels, run_preds = read_predictions(Path(rec[field]), class_names)
        if labels is None:
            labels = run_labels
        elif not np.array_equal(labels, run_labels):
            raise ConfigError(f"{rec[field]}: its test labels differ from the other runs' (not the same split)")
        preds.setdefault(rec["regime"], {}).setdefault(rec["shots_per_class"], []).append(run_preds)
    return labels, preds


def test_against_start(
    records: list[dict], class_names: list[str], metrics: list[str], labels: np.ndarray | None, final: dict
) -> dict:
    """``{regime: {shots: {metric: {"start", "final", "diff", "ci95", "p_value"}}}}``: each (regime, shots) whose
    every final run also scored its start on test (a run that trained from a probe), the final runs (``final``:
    ``test_predictions``' per-seed predictions, on ``labels``) against their own starts on the same test images,
    seeds paired (a reference: nothing is chosen by it)."""
    start_labels, start = test_predictions(records, class_names, "start_test_predictions")
    if labels is None or start_labels is None:
        return {}
    if not np.array_equal(labels, start_labels):
        raise ConfigError("the starts' test labels differ from the final models' (start_test_predictions.csv)")
    runs = Counter((rec["regime"], rec["shots_per_class"]) for rec in records)
    out: dict = {}
    for regime, by_shots in start.items():
        for shots, starts in by_shots.items():
            finals = final.get(regime, {}).get(shots, [])
            # Both lists follow the records' order; every run of the group in both, or no pairing of seeds.
            if not len(starts) == len(finals) == runs[(regime, shots)]:
                continue
            a, b = np.stack(finals), np.stack(starts)
            out.setdefault(regime, {})[shots] = {
                m: {
                    "start": float(np.mean([metric_value(m, labels, p, len(class_names)) for p in b])),
                    "final": float(np.mean([metric_value(m, labels, p, len(class_names)) for p in a])),
                    **paired_difference(m, labels, a, b, len(class_names)),
                }
                for m in metrics
            }
    return out


def out_of_fold(records: list[dict], shots: str) -> dict:
    """``{regime: {"rows", "labels", "preds"}}``: each regime's chosen out-of-fold predictions for ``shots`` (from
    its selection's ``oof``, the chosen candidate's; regimes without one are left out)."""
    out = {}
    for rec in records:
        path = (rec.get("selection") or {}).get("oof")
        if rec["shots_per_class"] != shots or rec["regime"] in out or not path or not Path(path).is_file():
            continue
        with np.load(path) as z:
            out[rec["regime"]] = {"rows": z["rows"], "labels": z["labels"], "preds": z["probs"].argmax(1)}
    return out


def selection_test_gaps(summary: dict, verdict_: dict, metric: str) -> list[dict]:
    """Regimes whose selection and test scores differ by more than their combined 95% intervals (``gap``: selection
    minus test; ``report.render.selection_test_gap_text`` says what each direction can mean)."""
    out = []
    for regime, sel in verdict_["selection"].items():
        row = summary[regime][verdict_["shots"]]
        test = (row.get("test_bootstrap") or {}).get(metric)
        if sel["score"] is None or test is None:
            continue
        gap = sel["score"] - test["mean"]
        bound = 1.96 * float(np.hypot(sel["se"], test["se"]))
        if abs(gap) > bound:
            out.append({"regime": regime, "selection": sel["score"], "test": test["mean"], "gap": gap, "bound": bound})
    return out


def decide(results: dict, metric: str) -> None:
    """Add bootstrap test intervals to ``results["summary"]`` and decide ``results["verdict"]`` (in place)."""
    class_names = results["class_names"]
    labels, preds = test_predictions(results["runs"], class_names)
    summary = results["summary"]
    metrics = sorted({"acc", metric})
    for regime, by_shots in preds.items():
        for shots, seeds in by_shots.items():
            summary[regime][shots]["test_bootstrap"] = {
                m: bootstrap_interval(m, labels, np.stack(seeds), len(class_names)) for m in metrics
            }
    for regime, by_shots in test_against_start(results["runs"], class_names, metrics, labels, preds).items():
        for shots, against in by_shots.items():
            summary[regime][shots]["test_vs_start"] = against
    shots = headline_shots(summary)
    paired = (
        paired_inputs(labels, len(class_names), {r: by.get(shots, []) for r, by in preds.items()})
        if labels is not None
        else None
    )
    oof = out_of_fold(results["runs"], shots)
    results["verdict"] = verdict(summary, metric, paired, oof, num_classes=len(class_names))
    results["verdict"]["selection_test_gaps"] = selection_test_gaps(summary, results["verdict"], metric)


def write_results(results: dict, report_dir: Path) -> None:
    """``results.json``, compact (no indentation: 40-60 % smaller): committed reports travel with every GPU kit call,
    which carries at most 64 MiB (``python -m json.tool results.json`` reads it indented)."""
    (report_dir / "results.json").write_text(json.dumps(results, separators=(",", ":")))


def rewrite_report(report_dir: Path, metric: str | None = None) -> None:
    """Recompute the verdict and re-render the report from an existing ``results.json`` (no run repeated)."""
    results = json.loads((report_dir / "results.json").read_text())
    decide(results, metric or results.get("verdict", {}).get("metric", "acc"))
    write_results(results, report_dir)
    write_report(results, report_dir)


def run_comparison(cfg: DictConfig, root: Path, worker_setup: Callable[[], None] | None = None) -> Path:
    """Run everything planned, then write ``results.json``, ``report.md`` and ``report.html`` (``worker_setup``:
    what each worker process does first when runs go side by side, e.g. configure logging)."""
    report_dir = report_dir_for(cfg)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info(
        f"{cfg.compare.name}: {list(cfg.compare.regimes)} x seeds {list(cfg.compare.seeds)} x shots "
        f"{[shots_key(s) for s in cfg.compare.shots]}, preset {cfg.compare.preset} -> {report_dir}"
    )
    records, skipped = run_all(cfg, report_dir, worker_setup)
    results = {
        "name": cfg.compare.name,
        "preset": cfg.compare.preset,
        "preset_note": cfg.compare.preset_note,
        "dataset": str(cfg.data.path),
        "backbone": cfg.backbone.name,
        "user_overrides": list(cfg.compare.get("user_overrides") or []),
        "class_names": json.loads((Path(records[0]["run_dir"]) / "metrics.json").read_text())["class_names"],
        "runs": records,
        "not_run": skipped,
        "summary": summarise_runs(records),
        "transfer_by_depth": depth_curve(records),
        "environment": describe_environment(root),
    }
    decide(results, cfg.compare.metric)
    write_results(results, report_dir)
    write_report(results, report_dir)
    return report_dir
