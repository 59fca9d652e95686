"""What a device stage is expected to cost: the seconds per run the last loan's log measured, times the runs the
stage's comparisons plan now."""

from __future__ import annotations

import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fmtransfer.gpu_kit.stages import DeviceStage

# A finished run, in every format a stage log has had: "[compare 3/48] finetune, seed 0, shots all: ... in 19 s"
# (before cross-validated selection), "[report] select: finetune, shots all, ...: fold acc 0.97 in 20 s" and
# "[report] final 3/8: finetune, seed 0, shots all: test acc 0.93 in 2 s"; lines of a job that ran beside others
# start with "[<job>] ".
RUN_LINE = re.compile(
    r"^(?:\[(?!report\])(?P<job>[\w-]+)\] )?(?:\[report\] )?(?:\[compare \d+/\d+\] |select: |final \d+/\d+: )"
    r"(?P<regime>\w+), .* in (?P<seconds>\d+(?:\.\d+)?) s$"
)
BENCH_LINE = re.compile(r"^\[gpu-report\] bench: .* after (?P<seconds>\d+) s$")
STAGE_LINE = re.compile(r"^\[gpu-report\] stage (?P<stage>[\w-]+) on (?P<device>.+), deadline")


@dataclass
class LoanFigures:
    """A stage log's measurements: the device, the bench's seconds, each (job, regime)'s seconds per run."""

    device: str
    bench_seconds: float | None
    run_seconds: dict[tuple[str, str], list[float]]

    def per_run(self, job: str, regime: str, fallback: str | None = None) -> float | None:
        """The median seconds of ``job``'s ``regime`` runs (``fallback``'s when it ran none)."""
        for name in (regime, fallback):
            if name and self.run_seconds.get((job, name)):
                return statistics.median(self.run_seconds[(job, name)])
        return None


def read_loan_figures(path: Path, stage: DeviceStage | None) -> LoanFigures:
    """``path``'s figures; lines not prefixed by a job belong to the one experiment that ran alone first (a stage
    named after an experiment, or the first group of one)."""
    alone = stage.groups[0][0].name if stage and stage.groups and len(stage.groups[0]) == 1 else None
    device, bench = "", None
    runs: dict[tuple[str, str], list[float]] = {}
    for line in path.read_text(errors="replace").splitlines():
        if m := STAGE_LINE.match(line):
            device = m["device"]
        elif m := BENCH_LINE.match(line):
            bench = float(m["seconds"])
        elif (m := RUN_LINE.match(line)) and (job := m["job"] or alone):
            runs.setdefault((job, m["regime"]), []).append(float(m["seconds"]))
    return LoanFigures(device, bench, runs)


def latest_log(logs: Path, stage: str) -> Path | None:
    """The newest committed log of ``stage`` (``gpu-report-<stage>-<commit>.log``): by the date of the commit it
    names (the kit's code when it ran), else by mtime."""

    def committed(path: Path) -> float:
        commit = path.stem.rsplit("-", 1)[-1]
        try:
            out = subprocess.run(
                ["git", "log", "-1", "--format=%ct", commit],
                cwd=logs,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            return float(out)
        except (OSError, subprocess.SubprocessError, ValueError):
            return path.stat().st_mtime

    found = sorted(logs.glob(f"gpu-report-{stage}-*.log"), key=committed)
    return found[-1] if found else None


def stage_seconds(
    stage: DeviceStage,
    figures: LoanFigures,
    runs: dict[str, dict[str, int]],
    fallbacks: dict[str, str],
    workers: int = 1,
) -> tuple[float, list[str]]:
    """Expected seconds of ``stage``: the bench, then each group's runs spread evenly over the device's ``workers``
    run slots, which its comparisons share (a bound: runs side by side share the device). ``runs``: each
    experiment's planned runs per regime. Also the regimes not measured."""
    total = (figures.bench_seconds or 0.0) if stage.bench else 0.0
    unknown = []
    for group in stage.groups:
        work = 0.0
        for experiment in group:
            for regime, count in runs[experiment.name].items():
                per_run = figures.per_run(experiment.name, regime, fallbacks.get(regime))
                if per_run is None and experiment.config:  # the same dataset and settings, under another name
                    per_run = figures.per_run(experiment.config, regime, fallbacks.get(regime))
                if per_run is None:
                    unknown.append(f"{experiment.name}/{regime}")
                    continue
                work += count * per_run
        total += work / max(1, workers)
    return total, unknown
