"""Head2Toe's selection head against the multilayer head, on cross-validation only (never the test split).

python scripts/selective-head.py [experiment ...] [-- overrides...]: for each experiment (default: hymenoptera,
uiuc_texture, pneumoniamnist) runs `make compare`'s selection for the frozen regime alone (CPU preset: its shots and
3 folds, seed 0) over frozen's whole sweep (compare.sweep.frozen: linear, multilayer and the selective candidates) and
prints a Markdown table per shots setting: each candidate's pooled out-of-fold accuracy at its chosen epoch and its
paired difference from multilayer on the same images, with the paired standard error. The tables go into
docs/selective-head.md with the command that made them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fmtransfer.cli.common import quiet_libraries
from fmtransfer.cli.compare import resolve_preset
from fmtransfer.report.compare import run_comparison
from fmtransfer.report.paired import paired_se

EXPERIMENTS = ["hymenoptera", "uiuc_texture", "pneumoniamnist"]
REFERENCE = "head.name=multilayer"


def oof_predictions(candidate: dict) -> tuple[np.ndarray, np.ndarray]:
    with np.load(candidate["oof"]) as z:
        return z["labels"], z["probs"].argmax(1)


def tables(results: dict) -> str:
    out = []
    for run in results["runs"]:
        sel = run.get("selection") or {}
        if run["regime"] != "frozen" or run["seed"] != 0 or not sel.get("candidates"):
            continue
        candidates = sel["candidates"]
        reference = next(c for c in candidates if REFERENCE in c["overrides"])
        labels, ref_preds = oof_predictions(reference)
        lines = [
            f"**{results['name']}, {run['shots_per_class']} shots** ({sel['folds']}-fold CV over {sel['n_scored']} "
            f"labelled images; chosen: `{' '.join(sel['settings']['overrides'])}`)",
            "",
            "| candidate | pooled OOF acc | epoch | vs multilayer (paired, ± SE) |",
            "|---|---|---|---|",
        ]
        for c in candidates:
            c_labels, preds = oof_predictions(c)
            assert np.array_equal(c_labels, labels), "candidates are scored on the same images"
            se = paired_se("acc", labels, preds, ref_preds, len(results["class_names"]))
            versus = "reference" if c is reference else f"{c['score'] - reference['score']:+.3f} ± {se:.3f}"
            name = " ".join(o for o in c["overrides"] if not o.startswith(("head.levels", "head.lr")))
            lines.append(f"| `{name}` | {c['score']:.3f} | {c['epoch']} | {versus} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main(argv: list[str]) -> None:
    experiments, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    quiet_libraries()
    for experiment in experiments or EXPERIMENTS:
        overrides = [
            f"experiment={experiment}",
            "compare.preset=cpu",
            "compare.regimes=[frozen]",
            "compare.seeds=[0]",
            *extra,
        ]
        report_dir = run_comparison(resolve_preset(overrides), Path(__file__).resolve().parents[1])
        print(tables(json.loads((Path(report_dir) / "results.json").read_text())), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
