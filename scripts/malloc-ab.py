"""One real fit with glibc's allocator defaults and with ``trainer.malloc``'s, alternated in fresh processes.

    python scripts/malloc-ab.py [--pairs 3] [override ...]

Default fit: a fold of the CPU preset's hymenoptera comparison (finetune, 160 px, fold 2 of 3), which needs the
shared datasets. Each fit runs in its own process (the allocator's settings are per process), the two kinds
alternated so that machine load falls on both alike, after one untimed fit that decodes and caches. Prints each
fit's ``fit`` and ``start_score`` seconds and its mean validation pass, then the means and their ratio. What
docs/benchmarks.md reads from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A fold of the CPU preset's hymenoptera comparison: finetune at 160 px, 4 epochs (20 steps at least), fold 2 of 3.
DEFAULT_FIT = [
    "experiment=hymenoptera",
    f"paths.shared_datasets={ROOT.parent / 'shared' / 'datasets'}",
    "regime=finetune",
    "regime.image_size=160",
    "regime.epochs=4",
    "regime.min_steps=20",
    "data.cv.folds=3",
    "+data.cv.fold=1",
    "trainer.progress_bar=false",
]
CHILD = """
import json, sys
from pathlib import Path
from fmtransfer.cli.config import compose_config
from fmtransfer.regimes import run_regime
metrics = run_regime(compose_config(sys.argv[2:]), Path(sys.argv[1]))
print("RESULT " + json.dumps({"phases": metrics["phase_seconds"], "validation": metrics["seconds_per_validation"]}))
"""


def one_fit(work: Path, name: str, overrides: list[str]) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(work / name), *overrides], capture_output=True, text=True, cwd=ROOT
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        sys.exit(f"{name} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides of the fit (default: the hymenoptera fold)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = [*(args.overrides or DEFAULT_FIT), f"paths.data_dir={work / 'data'}", f"paths.log_dir={work / 'logs'}"]
        one_fit(work, "warm-cache", [*base, "regime.epochs=1", "regime.min_steps=1"])  # decode and cache, untimed
        kinds = {"glibc defaults": ["trainer.malloc=null"], "trainer.malloc": []}
        fits: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for pair in range(args.pairs):
            for kind, extra in kinds.items():
                result = one_fit(work, f"{kind.replace(' ', '-')}-{pair}", [*base, *extra])
                fits[kind].append(result)
                p = result["phases"]
                print(
                    f"{kind:15s} pair {pair}: fit {p['fit']:.2f} s, start_score {p['start_score']:.3f} s, "
                    f"one validation {result['validation']:.3f} s",
                    flush=True,
                )
    means = {
        kind: {
            "fit": statistics.mean(r["phases"]["fit"] for r in rs),
            "start_over_validation": statistics.mean(r["phases"]["start_score"] / r["validation"] for r in rs),
        }
        for kind, rs in fits.items()
    }
    for kind, m in means.items():
        print(f"{kind:15s} mean fit {m['fit']:.2f} s, mean start / validation {m['start_over_validation']:.2f}")
    print(
        f"fit, glibc defaults / trainer.malloc: {means['glibc defaults']['fit'] / means['trainer.malloc']['fit']:.2f}x"
    )


if __name__ == "__main__":
    main()
