"""``make compare``: run every planned run (``runs``), decide (``verdict``), render the report (``render``)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fmtransfer.report.environment import describe_environment
from fmtransfer.report.render import write_report
from fmtransfer.report.runs import depth_curve, report_dir_for, run_all, shots_key
from fmtransfer.report.stats import summarise_runs
from fmtransfer.report.verdict import verdict


def rewrite_report(report_dir: Path) -> None:
    """Recompute the verdict and re-render the report from an existing ``results.json`` (no run repeated)."""
    results = json.loads((report_dir / "results.json").read_text())
    results["verdict"] = verdict(results["summary"])
    (report_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, report_dir)


def run_comparison(cfg: DictConfig, root: Path) -> Path:
    """Run everything planned, then write ``results.json``, ``report.md`` and ``report.html``."""
    report_dir = report_dir_for(cfg)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    print(
        f"[compare] {cfg.compare.name}: {list(cfg.compare.regimes)} x seeds {list(cfg.compare.seeds)} x shots "
        f"{[shots_key(s) for s in cfg.compare.shots]}, preset {cfg.compare.preset} -> {report_dir}"
    )
    records, skipped = run_all(cfg, report_dir)
    summary = summarise_runs(records)
    results = {
        "name": cfg.compare.name,
        "preset": cfg.compare.preset,
        "preset_note": cfg.compare.preset_note,
        "dataset": str(cfg.data.path),
        "backbone": cfg.backbone.name,
        "frozen_head": cfg.head.name,
        "class_names": json.loads((Path(records[0]["run_dir"]) / "metrics.json").read_text())["class_names"],
        "runs": records,
        "not_run": skipped,
        "summary": summary,
        "verdict": verdict(summary),
        "transfer_by_depth": depth_curve(records),
        "environment": describe_environment(root),
    }
    (report_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, report_dir)
    return report_dir
