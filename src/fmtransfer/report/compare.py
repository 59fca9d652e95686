"""``make compare``: regimes x seeds x shots-per-class on the same splits, then ``results.json`` and the report.

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
from fmtransfer.metrics import METRIC_NAMES
from fmtransfer.regimes import REGIMES
from fmtransfer.report.environment import describe_environment
from fmtransfer.report.render import write_report
from fmtransfer.report.stats import summarise

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
)


def shots_key(shots) -> str:
    return "all" if shots in (None, "all") else str(int(shots))


def report_dir_for(cfg: DictConfig) -> Path:
    """A directory named by what is compared and by the code that compares it, so the same command with the same
    code finds (and resumes) the same comparison, and a code change never mixes old runs into a new report."""
    c = cfg.compare
    identity = OmegaConf.to_container(cfg, resolve=True)
    for volatile in ("compare", "paths", "resume"):
        identity.pop(volatile, None)
    identity["trainer"].pop("progress_bar", None)
    identity["code"] = source_fingerprint()
    identity["compare"] = {"regimes": list(c.regimes), "seeds": list(c.seeds), "shots": [shots_key(s) for s in c.shots]}
    return Path(c.out_dir) / f"{c.name}-{c.preset}-{mapping_key(identity)}"


def run_config(cfg: DictConfig, regime: str, seed: int, shots) -> DictConfig:
    """The config of one run: same splits (``data.split_seed`` fixed), this seed, this k-shot subset."""
    run = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    run.regime = regime
    run.seed = seed
    run.data.shots_per_class = None if shots_key(shots) == "all" else int(shots)
    run.data.shots_seed = seed  # each seed sees its own k-shot subset: the spread covers the subset choice too
    return run


def run_all(cfg: DictConfig, report_dir: Path) -> list[dict]:
    """Run (or reuse) every planned run; returns their records in plan order."""
    c = cfg.compare
    unknown = [r for r in c.regimes if r not in REGIMES]
    if unknown:
        raise ConfigError(f"compare.regimes has {unknown}; choose from {sorted(REGIMES)}.")
    # "all" first: the headline numbers are ready even if a long comparison is stopped early.
    shots_order = sorted(c.shots, key=lambda s: (shots_key(s) != "all", 0 if shots_key(s) == "all" else int(s)))
    plan = [(r, s, k) for k in shots_order for s in c.seeds for r in c.regimes]
    records = []
    for i, (regime, seed, shots) in enumerate(plan, 1):
        run_dir = report_dir / "runs" / f"{regime}-shots{shots_key(shots)}-seed{seed}"
        done = run_dir / "metrics.json"
        label = f"[compare {i}/{len(plan)}] {regime}, seed {seed}, shots {shots_key(shots)}"
        if done.is_file():
            print(f"{label}: done earlier, reusing {done}")
            metrics = json.loads(done.read_text())
        else:
            print(f"{label}: running")
            start = time.perf_counter()
            metrics = REGIMES[regime](run_config(cfg, regime, seed, shots), run_dir)
            print(f"{label}: test acc {metrics['test']['acc']:.4f} in {time.perf_counter() - start:.0f} s")
        record = {k: metrics.get(k) for k in RUN_FIELDS}
        record.update(shots_per_class=shots_key(shots), run_dir=str(run_dir))
        records.append(record)
    return records


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
                    split: {m: summarise([r[split][m] for r in recs], bounds=(0.0, 1.0)) for m in METRIC_NAMES}
                    for split in ("test", "val")
                }
                | {
                    k: summarise([r[k] for r in recs])
                    for k in ("train_seconds", "seconds_per_epoch", "epochs", "peak_memory_bytes")
                }
                | {
                    "trainable_params": recs[0]["trainable_params"],
                    "peak_memory_kind": recs[0]["peak_memory_kind"],
                    "image_size": recs[0]["image_size"],
                    "seeds": [r["seed"] for r in recs],
                    # Runs in which no epoch beat the starting weights on validation loss (they were kept).
                    "kept_start": sum(str(r.get("selected") or "").startswith("initial") for r in recs),
                }
            )
    return summary


def headline_shots(summary: dict) -> str:
    """The shots setting the verdict is about: ``all`` if compared, else the largest k."""
    keys = {k for by in summary.values() for k in by}
    return "all" if "all" in keys else str(max(int(k) for k in keys))


def time_ratio_text(ratio: float) -> str:
    """``3.2× the winner's time`` or ``1/25 of the winner's time``."""
    if ratio >= 0.5:
        return f"{ratio:.1f}× the winner's time"
    return f"1/{1 / ratio:.0f} of the winner's time" if ratio > 0 else "no measurable time"


def verdict(summary: dict) -> dict:
    """Which regime wins (chosen on validation accuracy), by how much on test, at what cost: computed, not written."""
    shots = headline_shots(summary)
    rows = {r: by[shots] for r, by in summary.items() if shots in by}
    # Selection on validation only; ties go to the cheaper regime.
    winner = max(rows, key=lambda r: (rows[r]["val"]["acc"]["mean"], -rows[r]["train_seconds"]["mean"]))
    w = rows[winner]
    wt, wacc = w["train_seconds"]["mean"], w["test"]["acc"]
    n = wacc["n"]
    lines = [
        f"**{winner}** wins with {'all training images' if shots == 'all' else f'{shots} images per class'} "
        f"(chosen on validation accuracy, mean of {n} seed{'s' if n > 1 else ''}): test accuracy "
        f"{wacc['mean']:.3f} ± {wacc['std']:.3f} (95% CI {wacc['ci95'][0]:.3f}–{wacc['ci95'][1]:.3f}), "
        f"{w['trainable_params']:,} trainable parameters, {wt:.1f} s of training."
    ]
    comparisons = {}
    for other, o in sorted(rows.items(), key=lambda kv: -kv[1]["test"]["acc"]["mean"]):
        if other == winner:
            continue
        oacc, ot = o["test"]["acc"], o["train_seconds"]["mean"]
        delta = (wacc["mean"] - oacc["mean"]) * 100
        overlap = not (wacc["ci95"][0] > oacc["ci95"][1] or oacc["ci95"][0] > wacc["ci95"][1])
        cost = ot / wt if wt > 0 else float("inf")
        comparisons[other] = {"delta_points": delta, "intervals_overlap": overlap, "time_ratio": cost}
        lines.append(
            f"- vs **{other}**: {delta:+.1f} points ({oacc['mean']:.3f} ± {oacc['std']:.3f}; "
            f"{'95% intervals overlap, so not a clear difference' if overlap else 'a clear difference'}); "
            f"{other} trains {o['trainable_params']:,} parameters for {ot:.1f} s ({time_ratio_text(cost)})."
        )
    best_test = max(rows, key=lambda r: rows[r]["test"]["acc"]["mean"])
    if best_test != winner:
        lines.append(
            f"On the test split **{best_test}** scores highest; the winner is chosen on validation, as a user "
            f"without test labels would."
        )
    cheaper = [
        r
        for r in rows
        if rows[r]["train_seconds"]["mean"] < wt
        and (wacc["mean"] - rows[r]["test"]["acc"]["mean"]) * 100 <= 1.0
        and r != winner
    ]
    if cheaper:
        gaps = ", ".join(f"{r} ({(rows[r]['test']['acc']['mean'] - wacc['mean']) * 100:+.1f})" for r in cheaper)
        lines.append(f"Cheaper than the winner and no more than 1 point below it on test: {gaps}.")
    return {"shots": shots, "winner": winner, "comparisons": comparisons, "text": "\n".join(lines)}


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
    records = run_all(cfg, report_dir)
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
        "summary": summary,
        "verdict": verdict(summary),
        "transfer_by_depth": depth_curve(records),
        "environment": describe_environment(root),
    }
    (report_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, report_dir)
    return report_dir
