"""A bounded search for the fine-tuning recipe, on cross-validation only (never the test split).

python scripts/finetune-recipe.py <experiment> [--variants N] [extra overrides...]: runs `make compare`'s selection
for the finetune regime alone (CPU preset sizes, the comparison's own 3 folds, seed 0, all images) over the first N
(default: all) of at most 8 recipe variants, and prints a Markdown table: each variant's pooled out-of-fold accuracy
at its chosen epoch, that epoch, the same folds' accuracy at epoch 0 (the linear-probe start) and the gain with its
paired standard error. The table goes into docs/finetune-recipe.md with the command that made it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fmtransfer.cli.compare import resolve_preset
from fmtransfer.report.compare import run_comparison

# Each variant adds one ingredient of the literature's recipe to the previous one (LP-FT is every variant's start).
VARIANTS = {
    "as before: BatchNorm adapting, no warm-up, one backbone LR": ["regime.fixed_bn_stats=false"],
    "+ BatchNorm statistics fixed": ["regime.fixed_bn_stats=true"],
    "+ 1 warm-up epoch": ["regime.fixed_bn_stats=true", "regime.warmup_epochs=1.0"],
    "+ layer decay 0.75": ["regime.fixed_bn_stats=true", "regime.warmup_epochs=1.0", "regime.layer_decay=0.75"],
    "+ drop-path 0.1": [
        "regime.fixed_bn_stats=true",
        "regime.warmup_epochs=1.0",
        "regime.layer_decay=0.75",
        "regime.drop_path_rate=0.1",
    ],
    "+ label smoothing 0.1": [
        "regime.fixed_bn_stats=true",
        "regime.warmup_epochs=1.0",
        "regime.layer_decay=0.75",
        "regime.drop_path_rate=0.1",
        "regime.label_smoothing=0.1",
    ],
}


def sweep_override(variants: dict[str, list[str]]) -> str:
    inner = ",".join("[" + ",".join(f"'{o}'" for o in v) + "]" for v in variants.values())
    return f"compare.sweep.finetune=[{inner}]"


def table(results: dict) -> str:
    sel = next(r["selection"] for r in results["runs"] if r["regime"] == "finetune")
    names = {tuple(v): k for k, v in VARIANTS.items()}
    lines = [
        "| variant | pooled OOF acc | chosen epoch | epoch-0 acc (same folds) | gain ± paired SE |",
        "|---|---|---|---|---|",
    ]
    for c in sel["candidates"]:
        start, se = (c.get("start_scores") or {}).get("acc"), (c.get("gain_se") or {}).get("acc")
        gain = f"{(c['score'] - start) * 100:+.1f} ± {se * 100:.1f} points" if start is not None else "–"
        lines.append(
            f"| {names.get(tuple(c['overrides']), ' '.join(c['overrides']))} | {c['score']:.3f} | "
            f"{c['epoch']} of {c['horizon']} | {start if start is None else f'{start:.3f}'} | {gain} |"
        )
    return "\n".join(lines) + f"\n\n{sel['folds']}-fold CV over {sel['n_scored']} labelled images."


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    experiment, extra = argv[0], argv[1:]
    variants = VARIANTS
    if extra[:1] == ["--variants"]:
        variants = dict(list(VARIANTS.items())[: int(extra[1])])
        extra = extra[2:]
    overrides = [
        f"experiment={experiment}",
        "compare.preset=cpu",
        "compare.regimes=[finetune]",
        "compare.seeds=[0]",
        "compare.shots=[all]",
        sweep_override(variants),
        *extra,
    ]
    report_dir = run_comparison(resolve_preset(overrides), Path(__file__).resolve().parents[1])
    print(table(json.loads((Path(report_dir) / "results.json").read_text())))


if __name__ == "__main__":
    main(sys.argv[1:])
