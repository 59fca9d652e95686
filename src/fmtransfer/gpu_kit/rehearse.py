"""``make gpu-report STAGE=rehearse``: the whole kit on the CPU at tiny sizes, run by CI every day.

pack (a few images per class) -> the device stages through the same ``scripts/gpu-stage`` (wheels installed into a
scratch site folder, the stage's archive left in an out folder) -> unpack into a temporary folder, whose layout is
checked. The comparisons run with the full preset's settings, on the CPU instead of a GPU and in fp32 instead of bf16
(emulated bf16 is ~8x slower here; tests cover bf16-mixed on the CPU): channels-last and decoding workers run here
too. Prints ``rehearsal: <folder>`` last.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from fmtransfer.errors import FmtransferError
from fmtransfer.gpu_kit.pack import pack
from fmtransfer.gpu_kit.stages import DATASETS, EXPERIMENTS
from fmtransfer.gpu_kit.unpack import unpack

log = logging.getLogger(__name__)

TINY_PER_CLASS = 6
TINY_OVERRIDES = {
    # fp32: emulated bf16 is ~8x slower on CPUs without native bf16 (tests cover bf16-mixed on the CPU).
    "*": ["trainer.accelerator=cpu", "trainer.precision=32-true", "data.num_workers=2", "trainer.progress_bar=false"],
    "bench": [
        "data.image_size=32",
        "data.shots_per_class=8",
        "bench.epochs=2",
        "bench.rounds=1",
        "bench.repeats=1",
        "bench.partial_epochs=1",
        "bench.fast_path.data=none",
        "bench.partial_views.ks=[1]",
        "bench.partial_views.epochs=1",
        "bench.partial_views.data.image_size=32",
        "bench.partial_views.data.shots_per_class=4",
        "bench.jpeg_extraction.images=64",
        "bench.jpeg_extraction.image_size=32",
        "regimes.partial.views=2",
    ],
    **{
        name: [
            "compare.seeds=[0]",
            "compare.shots=[all]",
            "data.image_size=32",
            "head.epochs=3",
            "head.min_steps=3",
            # The kit's plumbing, not the regimes (tests cover those): frozen only, 2 folds, the configured settings
            # (CI time: the whole suite must stay under 15 minutes).
            "compare.regimes=[frozen]",
            "compare.selection.folds=2",
            *[f"compare.sweep.{r}=[[]]" for r in ("frozen", "partial", "finetune", "scratch")],
            *[
                f"regimes.{r}.{k}={v}"
                for r in ("partial", "finetune", "scratch")
                for k, v in (("epochs", 1), ("min_steps", 2))
            ],
        ]
        for name in EXPERIMENTS
    },
}
REPORT_LAYOUT = ("report.md", "report.html", "results.json")


def run_device_stage(root: Path, stage: str, kit: Path, out: Path, site: Path) -> Path:
    """``bash scripts/gpu-stage <stage>`` as on the device, with this Python and the tiny overrides."""
    env = dict(
        os.environ,
        GPU_KIT=str(kit),
        PYTHON=sys.executable,
        OUT=str(out),
        GPU_KIT_SITE=str(site),
        GPU_REPORT_OVERRIDES=json.dumps(TINY_OVERRIDES),
    )
    log.info(f"device stage {stage} on the CPU")
    done = subprocess.run(["bash", str(root / "scripts" / "gpu-stage"), stage], cwd=root, env=env)
    archive = out / f"gpu-report-{stage}.tar.gz"
    if done.returncode != 0 or not archive.is_file():
        raise FmtransferError(f"rehearse: stage {stage} failed (exit {done.returncode}); its log: {out}")
    return archive


def rehearse(root: Path, shared: Path) -> Path:
    """Pack tiny, run the device stages here, unpack into ``<tmp>/unpacked``; returns that folder."""
    folder = Path(tempfile.mkdtemp(prefix="fmtransfer-rehearsal-"))
    kit, out, site, dest = folder / "kit", folder / "out", folder / "site", folder / "unpacked"
    datasets = [d for d in DATASETS if (shared / d).is_dir()]
    if not datasets:
        log.info(f"{shared} is missing: rehearsing the bench stage only (the comparisons need its datasets)")
    # Wheels for this interpreter (the device's are for its Python 3.12): the same packages, versions and install step.
    # Without the extra wheels (peft's): the rehearsed "all" stage does not carry them (CI time).
    pack(root, shared, datasets, per_class=TINY_PER_CLASS, kit=kit, python=platform.python_version(), extras=False)
    # "all" covers the bench, a comparison alone (its first group) and comparisons run at once (its second); the
    # single-experiment stages are the same code with one group (CI time: the suite must stay under 15 minutes).
    stages = ["all"] if len(datasets) == len(DATASETS) else ["bench"]
    for stage in stages:
        unpack(run_device_stage(root, stage, kit, out, site), root, dest)
    expected = [dest / "reports" / f"{name}-cpu" / f for name in datasets for f in REPORT_LAYOUT]
    expected.append(dest / "docs" / "benchmarks.md")
    missing = [str(p) for p in expected if not p.is_file()]
    if missing:
        raise FmtransferError(f"rehearse: the unpacked layout lacks {missing}")
    return dest
