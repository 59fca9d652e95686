"""``make compare``: every regime x seed x shots on one dataset, then the evaluation report.

Prints ``report dir: <path>`` last. Without a GPU the CPU preset is chosen automatically, and the run says so.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fmtransfer.cli.common import quiet_libraries, user_errors
from fmtransfer.cli.config import compose_config, config_dir
from fmtransfer.errors import FmtransferError
from fmtransfer.metrics import METRIC_NAMES
from fmtransfer.report.selection import sweep_without, user_keys

log = logging.getLogger(__spec__.name)  # not __name__: "__main__" under python -m, outside fmtransfer's logger


def resolve_preset(overrides: list[str]) -> DictConfig:
    """Compose once to read the presets, then again with the chosen preset's overrides before the user's."""
    cfg = compose_config(overrides, name="compare")
    preset = cfg.compare.preset
    if preset == "auto":
        preset = "full" if torch.cuda.is_available() else "cpu"
        if preset == "cpu":
            log.info("no GPU found: using the CPU preset (compare.preset=full to force the full settings)")
    if preset not in cfg.compare.presets:
        raise FmtransferError(
            f"compare.preset={preset} is not known; choose auto or one of {sorted(cfg.compare.presets)}."
        )
    selection = (cfg.compare.get("selection_presets") or {}).get(preset) or []
    preset_overrides = [*cfg.compare.presets[preset], *selection, *budget_links(cfg)]
    final = compose_config([*preset_overrides, f"compare.preset={preset}", *overrides], name="compare")
    final.compare.preset_note = str(final.compare.preset_notes[preset])
    if final.compare.metric not in METRIC_NAMES:  # before any run, not when the report is written
        raise FmtransferError(
            f"compare.metric={final.compare.metric} is not known; choose one of {list(METRIC_NAMES)}."
        )
    check_race(final)
    if final.compare.name is None:
        final.compare.name = dataset_name(str(final.data.path))
    # A user's override wins over the sweep: candidates no longer set what the command line set.
    keys = user_keys(overrides)
    if keys and final.compare.get("sweep"):
        final.compare.sweep = sweep_without(OmegaConf.to_container(final.compare.sweep), keys)
    final.compare.user_overrides = [o for o in overrides if str(o).split("=", 1)[0].lstrip("+~") in keys]
    return final


BUDGET_KEYS = ("epochs", "min_steps", "image_size")


def budget_links(cfg: DictConfig) -> list[str]:
    """Overrides that give each regime of ``compare.budget_of`` its source regime's budget, as interpolations (so
    a preset's or an experiment's sizes for the source reach it too)."""
    links = []
    for regime, source in (cfg.compare.get("budget_of") or {}).items():
        if regime not in cfg.regimes or source not in cfg.regimes:
            raise FmtransferError(f"compare.budget_of: {regime}: {source} names a regime not in {sorted(cfg.regimes)}.")
        links += [f"regimes.{regime}.{key}=${{regimes.{source}.{key}}}" for key in BUDGET_KEYS]
    return links


def check_race(cfg: DictConfig) -> None:
    """``compare.selection.race`` names regimes of the comparison's config and ``race_se`` is a number >= 0 (before
    any run, not when the first sweep is raced)."""
    sel = cfg.compare.selection
    unknown = sorted(set(sel.get("race") or []) - set(cfg.regimes))
    if unknown:
        raise FmtransferError(f"compare.selection.race has {unknown}; choose from {sorted(cfg.regimes)} or give [].")
    z = sel.get("race_se")
    if isinstance(z, bool) or not isinstance(z, (int, float)) or z < 0:
        raise FmtransferError(f"compare.selection.race_se={z!r} must be a number of standard errors >= 0 (e.g. 2.0).")


def dataset_name(path: str) -> str:
    """A comparison's name when no experiment names it: ``sklearn:digits`` -> digits, ``/data/my_cells/`` ->
    my_cells, ``owner/name`` (hub) -> name."""
    return path.split(":", 1)[1] if path.startswith("sklearn:") else Path(path.rstrip("/")).name or "dataset"


def main(argv: list[str] | None = None) -> None:
    from fmtransfer.report.compare import run_comparison

    overrides = list(sys.argv[1:] if argv is None else argv)
    quiet_libraries()
    with user_errors():
        cfg = resolve_preset(overrides)
        report_dir = run_comparison(cfg, config_dir().parent, worker_setup=quiet_libraries)
    print(f"report dir: {Path(report_dir).resolve()}")


if __name__ == "__main__":
    main()
