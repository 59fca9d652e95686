"""A device stage (``bash scripts/gpu-stage <stage>`` on the lent machine): run the bench and/or comparisons under one
deadline, and leave everything as one archive in ``$OUT`` (plus the stage's log), the only things that come back.

It runs the same entry points a user runs (``fmtransfer.cli.bench``, ``fmtransfer.cli.compare``) as subprocesses,
so a crash in one comparison leaves the others and the archive intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from fmtransfer.gpu_kit.stages import DATA, DeviceStage, Experiment
from fmtransfer.report.schedule import RUN_SLOTS_ENV, worker_count

log = logging.getLogger(__name__)

# make bench on a GPU: the backbone's own 224 px, bf16-mixed, NHWC (auto on CUDA), pinned memory, 8 decoding workers.
# partial on cached views vs live on one seed: the speed decides the full preset's partial, the CPU bench has the
# accuracy over seeds.
BENCH_OVERRIDES = (
    "trainer=gpu",
    "data.image_size=224",
    "cache.batch_size=256",
    "data.num_workers=8",
    "bench.partial_views.seeds=[0]",
    "bench.jpeg_extraction.images=10000",  # the GPU issue's >= 10k decodes, from the kit's 256 px JPEG copies
)
REPORT_FILES = ("report.md", "report.html", "results.json", "config.yaml")
REPORT_MARGIN_S = 60  # a comparison stops starting runs this long before the deadline, to write its report
FINAL_REPORT_S = 60  # reserved at the end: a comparison stopped mid-run writes its report from the runs it finished


@dataclass
class Job:
    """One subprocess of a stage: its command, its log, and how it ended."""

    name: str
    command: list[str]
    log: Path
    returncode: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    lines: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "command": " ".join(self.command[2:]),  # without the interpreter path
            "returncode": self.returncode,
            "seconds": round(self.seconds, 1),
            "timed_out": self.timed_out,
        }


def _pump(process: subprocess.Popen, job: Job, prefix: str, stream: TextIO) -> None:
    """Copy a job's output into its log and onto ``stream`` (prefixed when several jobs run at once)."""
    with job.log.open("w") as log:
        for line in process.stdout:  # type: ignore[union-attr]
            log.write(line)
            log.flush()
            job.lines.append(line.rstrip("\n"))
            stream.write(prefix + line)
            stream.flush()


def run_jobs(jobs: list[Job], deadline: float, env: dict[str, str]) -> None:
    """Run ``jobs`` at once; any still running at ``deadline`` (a ``time.monotonic`` value) is stopped."""
    started, pumps = [], []
    for job in jobs:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            job.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        prefix = f"[{job.name}] " if len(jobs) > 1 else ""
        pump = threading.Thread(target=_pump, args=(process, job, prefix, sys.stdout), daemon=True)
        pump.start()
        started.append((job, process, time.monotonic()))
        pumps.append(pump)
    for job, process, start in started:
        try:
            job.returncode = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            job.timed_out = True
            os.killpg(process.pid, signal.SIGTERM)
            try:
                job.returncode = process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                job.returncode = process.wait()
        job.seconds = time.monotonic() - start
    for pump in pumps:
        pump.join(timeout=10)


def last_value(lines: list[str], prefix: str) -> str | None:
    """The value of the last ``<prefix> <value>`` line an entry point printed (``report dir:``, ``bench:``)."""
    found = [line[len(prefix) :].strip() for line in lines if line.startswith(prefix)]
    return found[-1] if found else None


def bench_job(work: Path, kit: Path, extra: list[str]) -> Job:
    out = work / "bench"
    data = f"paths.shared_datasets={(kit / DATA).resolve()}"  # the photo figures read the kit's compact JPEGs
    command = [sys.executable, "-m", "fmtransfer.cli.bench", *BENCH_OVERRIDES, data, f"bench.out_dir={out}", *extra]
    return Job("bench", command, work / "bench.log")


def compare_job(experiment: Experiment, kit: Path, work: Path, budget_s: float, extra: list[str]) -> Job:
    command = [
        sys.executable,
        "-m",
        "fmtransfer.cli.compare",
        *experiment.arguments,
        "compare.preset=full",
        f"paths.shared_datasets={(kit / DATA).resolve()}",
        f"compare.out_dir={work.parent / 'compare'}",  # shared by stages: a rerun on a warm machine resumes
        f"compare.time_budget_s={int(budget_s)}",
        *extra,
    ]
    return Job(experiment.name, command, work / f"{experiment.name}.log")


def archive_stage(stage: DeviceStage, work: Path, jobs: list[Job], manifest: dict, out: Path) -> Path:
    """``<out>/<stage>.tar.gz``: manifest.json, each job's log, bench.json, each report (no checkpoints, no caches)."""
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"gpu-report-{stage.name}.tar.gz"
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(work / "manifest.json", arcname="manifest.json")
        for job in jobs:
            for log in (job.log, job.log.with_suffix(".report.log")):
                if log.is_file():
                    tar.add(log, arcname=f"{job.name}/{log.name}")
            if job.name == "bench" and (bench := last_value(job.lines, "bench:")):
                tar.add(bench, arcname="bench/bench.json")
            elif report := last_value(job.lines, "report dir:"):
                for name in REPORT_FILES:
                    tar.add(Path(report) / name, arcname=f"{job.name}/{name}")
                if (Path(report) / "figures").is_dir():
                    tar.add(Path(report) / "figures", arcname=f"{job.name}/figures")
    return archive


def run_stage(
    stage: DeviceStage, root: Path, kit: Path, out: Path, deadline_s: float, extra: dict[str, list[str]] | None = None
) -> Path:
    """Run ``stage``; ``extra`` adds overrides per job name ("bench", an experiment, or "*" for all)."""
    from fmtransfer.report.environment import describe_environment

    t0 = time.monotonic()
    deadline = t0 + deadline_s
    extra = extra or {}
    work = root / "logs" / "gpu-report" / stage.name
    shutil.rmtree(work, ignore_errors=True)  # a stage starts clean; the comparisons resume from their own run dirs
    work.mkdir(parents=True)
    kit_info = json.loads((kit / "kit.json").read_text()) if (kit / "kit.json").is_file() else {}
    # The device's copy of the tree may have no .git, or a stale one: reports name the commit the kit was packed at.
    if kit_info.get("commit"):
        os.environ["FMTRANSFER_COMMIT"] = str(kit_info["commit"])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    environment = describe_environment(root)
    log.info(f"stage {stage.name} on {environment['device']}, deadline {deadline_s:.0f} s")

    jobs: list[Job] = []
    if stage.bench:
        bench = bench_job(work, kit, [*extra.get("*", []), *extra.get("bench", [])])
        run_jobs([bench], deadline, env)
        jobs.append(bench)

    def compare_for(experiment: Experiment, budget: float, *settings: str) -> Job:
        overrides = [*settings, *extra.get("*", []), *extra.get(experiment.name, [])]
        return compare_job(experiment, kit, work, budget, overrides)

    compares: list[Job] = []
    # The device's run slots, one pool for every comparison of the stage: a comparison may use them all, and runs
    # as many at once as the others leave free (report/schedule.py RunSlots).
    workers = worker_count("auto", "gpu")
    env[RUN_SLOTS_ENV] = f"{work / 'run-slots'}:{workers}"
    for i, group in enumerate(stage.groups):
        # Each group gets an equal share of the time left; a group that finishes early leaves more to the next.
        left = deadline - FINAL_REPORT_S - time.monotonic()
        budget = max(left / (len(stage.groups) - i) - REPORT_MARGIN_S, 0.0)
        group_jobs = [compare_for(e, budget, f"compare.workers={workers}") for e in group]
        run_jobs(group_jobs, time.monotonic() + budget + REPORT_MARGIN_S, env)
        # A comparison stopped at its group's end has no report: one more pass with no time budget runs nothing new
        # and writes the report from the runs that finished (each run's metrics.json), saying which did not run.
        for experiment, job in zip(group, group_jobs, strict=True):
            if job.timed_out:
                final = compare_for(experiment, 0.0)
                final.name, final.log = job.name, job.log.with_suffix(".report.log")
                run_jobs([final], deadline, env)
                job.lines += final.lines
                job.returncode = final.returncode
        compares += group_jobs
    jobs += compares
    manifest = {
        "stage": stage.name,
        "environment": environment,
        "kit": kit_info,
        "parallel": stage.parallel,
        "groups": [[e.name for e in group] for group in stage.groups],
        "wall_seconds": round(time.monotonic() - t0, 1),
        "jobs": {job.name: job.summary() for job in jobs},
    }
    archive = archive_stage(stage, work, jobs, manifest, out)
    for job in jobs:
        state = "timed out" if job.timed_out else f"exit {job.returncode}"
        log.info(f"{job.name}: {state} after {job.seconds:.0f} s")
    print(f"archive: {archive}", flush=True)
    return archive
