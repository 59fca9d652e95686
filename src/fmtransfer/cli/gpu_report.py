"""``make gpu-report STAGE=plan|pack|unpack|rehearse`` here, ``bash scripts/gpu-stage <stage>`` on the device.

Prints the archive (``archive: <path>``), the unpacked files, or ``rehearsal: <folder>`` last.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

from fmtransfer.cli.common import quiet_libraries, user_errors
from fmtransfer.errors import FmtransferError
from fmtransfer.gpu_kit.stages import (
    CALL_LIMIT_MIB,
    DEADLINE_S,
    DEVICE_STAGES,
    KIT_DIR,
    LOCAL_STAGES,
    DeviceStage,
    Experiment,
    device_command,
)

ROOT = Path(__file__).resolve().parents[3]
SHARED = ROOT.parent / "shared" / "datasets"


def plan_text(estimates: bool = True) -> str:
    """Every stage: where it runs, its command, what it carries, its expected device time (``estimates``: also
    from the runs its comparisons plan and the last loan's seconds per run)."""
    lines = [
        "GPU report kit: pack here, then each device stage as ONE call of the device tool's `run`, then unpack here.",
        "",
        "here   make gpu-report STAGE=pack      wheels + compact datasets -> .gpu-kit/ (ignored; checks 64 MiB)",
    ]
    for stage in DEVICE_STAGES.values():
        carries = [f"{KIT_DIR}/{path}" for path in stage.carried()]
        lines += [
            f"device {stage.name}: {stage.why}; ~{stage.expected_minutes:g} min (deadline {DEADLINE_S} s)",
            f"         run(command='{device_command(stage.name)}', carry={carries}, timeout_s=600)",
            f"         leaves $OUT/gpu-report-{stage.name}.tar.gz + .log",
        ]
        if estimates and (estimate := stage_estimate(stage)):
            lines.append(f"         {estimate}")
    lines += [
        "here   make gpu-report STAGE=unpack FILE=<files_at>/gpu-report-<stage>.tar.gz",
        "         -> reports/<experiment>-<gpu>/ and a section of docs/benchmarks.md naming the device",
        "here   make gpu-report STAGE=rehearse  the whole sequence on the CPU at tiny sizes (CI runs it)",
        "",
        "Budget (seen on an H200, 2026-11-26): the start took ~30 s of device time and the machine is given back",
        "30 s after a call. With 15 min: run `all` (timeout_s=600); if 3+ min are left, call again AT ONCE (warm)",
        "with",
        "`GPU_REPORT_DEADLINE_S=<seconds left - 40> bash scripts/gpu-stage <experiment>`: comparisons resume from the",
        f"runs they finished. Each call carries at most {CALL_LIMIT_MIB} MiB (pack checks).",
    ]
    return "\n".join(lines)


LOGS = ROOT / "reports" / "h200-logs"


@functools.cache
def planned_runs_of(experiment: Experiment) -> tuple[dict[str, int], dict[str, str]]:
    """``experiment``'s planned runs per regime under the full preset, and its ``compare.budget_of``."""
    from fmtransfer.cli.compare import resolve_preset
    from fmtransfer.report.runs import planned_runs

    cfg = resolve_preset([*experiment.arguments, "compare.preset=full"])
    return planned_runs(cfg), {str(k): str(v) for k, v in (cfg.compare.get("budget_of") or {}).items()}


def stage_estimate(stage: DeviceStage) -> str | None:
    """``stage``'s expected device time: the runs its comparisons plan now (the full preset) times the seconds per
    run of the same experiment and regime in the last loan's log of that stage (else of ``all``)."""
    from fmtransfer.gpu_kit.estimate import latest_log, read_loan_figures, stage_seconds
    from fmtransfer.report.schedule import MAX_WORKERS

    if not stage.groups:
        return None
    log_path = latest_log(LOGS, stage.name) or latest_log(LOGS, "all")
    if log_path is None:
        return None
    runs, fallbacks = {}, {}
    for experiment in stage.experiments:
        runs[experiment.name], budget_of = planned_runs_of(experiment)
        fallbacks.update(budget_of)
    figures = read_loan_figures(log_path, DEVICE_STAGES.get(log_path.name.split("-")[2]))
    one, unknown = stage_seconds(stage, figures, runs, fallbacks)
    side_by_side, _ = stage_seconds(stage, figures, runs, fallbacks, workers=MAX_WORKERS)
    count = sum(sum(r.values()) for r in runs.values())
    over = f" (over the {DEADLINE_S} s deadline)" if side_by_side > DEADLINE_S else ""
    missing = f"; not measured: {', '.join(unknown)}" if unknown else ""
    return (
        f"expected: {count} planned runs x the seconds per run of {log_path.name} "
        f"({figures.device or 'device not named'}) = ~{one / 60:.0f} min one at a time, at best "
        f"~{side_by_side / 60:.0f} min{over} with {MAX_WORKERS} workers{missing}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gpu-report", description=__doc__)
    parser.add_argument("stage", choices=[*LOCAL_STAGES, *DEVICE_STAGES])
    parser.add_argument("--file", type=Path, help="unpack: the archive a device stage left")
    parser.add_argument("--kit", type=Path, default=ROOT / KIT_DIR)
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "gpu-report" / "out")
    parser.add_argument("--datasets", default="all", help="pack: comma-separated names, or all")
    args = parser.parse_args(argv)
    quiet_libraries()
    with user_errors():
        if args.stage == "plan":
            print(plan_text())
        elif args.stage == "pack":
            from fmtransfer.gpu_kit.pack import pack
            from fmtransfer.gpu_kit.stages import DATASETS

            names = list(DATASETS) if args.datasets == "all" else [d for d in args.datasets.split(",") if d]
            manifest = pack(ROOT, SHARED, names, kit=args.kit)
            print(json.dumps({k: manifest[k] for k in ("commit", "wheels", "datasets")}, indent=2))
            print(f"kit: {args.kit} ({manifest['call_bytes'] / 2**20:.1f} MiB per call with the tracked files)")
        elif args.stage == "unpack":
            from fmtransfer.gpu_kit.unpack import unpack

            if args.file is None:
                raise FmtransferError("unpack needs FILE=<archive> (make gpu-report STAGE=unpack FILE=...).")
            done = unpack(args.file, ROOT, ROOT)
            print("\n".join(f"wrote {p}" for p in done["written"]))
        elif args.stage == "rehearse":
            from fmtransfer.gpu_kit.rehearse import rehearse

            print(f"rehearsal: {rehearse(ROOT, SHARED)}")
        else:
            from fmtransfer.gpu_kit.device import run_stage

            overrides = json.loads(os.environ.get("GPU_REPORT_OVERRIDES") or "{}")
            deadline = float(os.environ.get("GPU_REPORT_DEADLINE_S", DEADLINE_S))
            run_stage(DEVICE_STAGES[args.stage], ROOT, args.kit, args.out, deadline, overrides)


if __name__ == "__main__":
    main()
