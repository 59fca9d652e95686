"""A bounded search for the fine-tuning recipe, on cross-validation only (never the test split).

python scripts/finetune-recipe.py <experiment> [--variants N|A,B,..] [--shots K] [--regime R] [overrides...]: runs
`make compare`'s selection for the finetune regime (or R, its sweep given as an override) alone (CPU preset sizes,
the comparison's own 3 folds, seed 0, all images or K shots per class) over the first N (default: all) or the
listed (1-based) of at most 8 recipe variants, and prints a Markdown table: each variant's pooled out-of-fold
accuracy at its chosen epoch, that epoch, the same folds' accuracy at epoch 0 (the linear-probe start) and the gain
with its paired standard error. The table goes into docs/finetune-recipe.md with the command that made it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fmtransfer.cli.common import quiet_libraries
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
    # From "+ 1 warm-up epoch": lighter augmentation (crops of 35-100 % of the image, no colour jitter), then more
    # optimisation (3x the steps), the budget the CPU preset would have to pay.
    "fixed BN + warm-up, lighter augmentation": [
        "regime.fixed_bn_stats=true",
        "regime.warmup_epochs=1.0",
        "data.augment.scale=[0.35,1.0]",
        "data.augment.color_jitter=0.0",
    ],
    "fixed BN + warm-up, lighter augmentation, 3x the steps": [
        "regime.fixed_bn_stats=true",
        "regime.warmup_epochs=1.0",
        "data.augment.scale=[0.35,1.0]",
        "data.augment.color_jitter=0.0",
        "regime.epochs=12",
        "regime.min_steps=60",
    ],
}


def sweep_override(variants: dict[str, list[str]], regime: str) -> str:
    inner = ",".join("[" + ",".join(f"'{o}'" for o in v) + "]" for v in variants.values())
    return f"compare.sweep.{regime}=[{inner}]"


def table(results: dict, regime: str) -> str:
    sel = next(r["selection"] for r in results["runs"] if r["regime"] == regime)
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
    quiet_libraries()
    experiment, extra = argv[0], argv[1:]
    variants, shots, regime = VARIANTS, "all", "finetune"
    while extra[:1] in (["--variants"], ["--shots"], ["--regime"]):
        flag, value, extra = extra[0], extra[1], extra[2:]
        if flag == "--shots":
            shots = value
        elif flag == "--regime":
            regime = value
        elif "," in value:
            variants = {k: v for i, (k, v) in enumerate(VARIANTS.items(), 1) if str(i) in value.split(",")}
        else:
            variants = dict(list(VARIANTS.items())[: int(value)])
    overrides = [
        f"experiment={experiment}",
        "compare.preset=cpu",
        f"compare.regimes=[{regime}]",
        "compare.seeds=[0]",
        f"compare.shots=[{shots}]",
        sweep_override(variants, regime),
        "compare.selection.race=[]",  # every variant on every fold: the table compares them all
        *extra,
    ]
    report_dir = run_comparison(resolve_preset(overrides), Path(__file__).resolve().parents[1])
    print(table(json.loads((Path(report_dir) / "results.json").read_text()), regime))


if __name__ == "__main__":
    main(sys.argv[1:])
