"""``make train``: one run of a regime on one dataset; prints ``run dir: <path>`` last."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from fmtransfer.cli.common import quiet_libraries, user_errors
from fmtransfer.cli.config import config_dir
from fmtransfer.errors import FmtransferError

log = logging.getLogger(__spec__.name)  # not __name__: "__main__" under python -m, outside fmtransfer's logger


def resume_target(path: str) -> tuple[Path, DictConfig]:
    """The interrupted run's directory and its saved (resolved) config, so it continues exactly as it started.

    It continues from ``checkpoints/last.ckpt`` when the run wrote one (see ``trainer.checkpoint_every_s``), else it
    starts that run again from its first step, in the same directory.
    """
    run_dir = Path(path).expanduser()
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise FmtransferError(f"resume={path}: no config.yaml there; give the run dir an interrupted run printed.")
    if (run_dir / "metrics.json").is_file():
        raise FmtransferError(f"resume={path}: that run finished (its results are in {run_dir / 'metrics.json'}).")
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        log.info(f"{run_dir} stopped before its first checkpoint: starting it again from the first step")
    return run_dir, OmegaConf.load(saved)


def summarise(metrics: dict) -> str:
    """The few lines a person reads after a run."""
    t, v, b = metrics["test"], metrics["val"], metrics["backbone"]
    lines = [f"regime    {metrics['regime']}: backbone {b['name']} ({b['weights']})"]
    if "head" in metrics:
        lines.append(f"head      {metrics['head']['name']} on {', '.join(metrics['head']['levels'])}")
    if "cache" in metrics:
        c = metrics["cache"]
        lines.append(f"cache     {'hit' if c['hit'] else 'built'} ({c['extract_seconds']:.1f} s extracting) {c['dir']}")
    for name, scores, absent in (
        ("val", v, "none (trained on the whole labelled pool, data.cv.refit)"),
        ("test", t, "not evaluated (a selection run: data.cv.fold or data.cv.given_validation)"),
    ):
        if scores:
            absent = (
                f"acc {scores['acc']:.4f}  f1_macro {scores['f1_macro']:.4f}  balanced_acc {scores['balanced_acc']:.4f}"
            )
        lines.append(f"{name:<10}{absent}")
    epochs = metrics["epochs"]
    lines += [
        f"time      training {metrics['train_seconds']:.1f} s ({epochs} epoch{'s' * (epochs != 1)}, "
        f"{metrics['trainable_params']:,} trainable parameters), run total {metrics['total_seconds']:.1f} s",
    ]
    return "\n".join(lines)


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    quiet_libraries()
    with user_errors():
        if cfg.get("resume"):
            run_dir, cfg = resume_target(str(cfg.resume))
        from fmtransfer.regimes import run_regime

        log.info(f"resume an interrupted run with: make train ARGS=resume={run_dir}")
        metrics = run_regime(cfg, run_dir)
    if rank_zero_only.rank == 0:  # under DDP the other ranks hold the same numbers
        print(summarise(metrics))
        print(f"run dir: {run_dir}")


def main() -> None:
    train()


if __name__ == "__main__":
    main()
