"""``make gpu-report STAGE=plan|pack|unpack|rehearse`` here, ``bash scripts/gpu-stage <stage>`` on the device.

Prints the archive (``archive: <path>``), the unpacked files, or ``rehearsal: <folder>`` last.
"""

from __future__ import annotations

import argparse
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
    device_command,
)

ROOT = Path(__file__).resolve().parents[3]
SHARED = ROOT.parent / "shared" / "datasets"


def plan_text() -> str:
    """Every stage: where it runs, its command, what it carries, its expected device time."""
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
