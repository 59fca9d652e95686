"""Backbones: a timm model, the feature maps it exposes (``feature_info`` levels + pooled pre-logits), freezing."""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
from torch import nn

from fmtransfer.backbone.convolution import conv_batchnorm_pairs, fold_batchnorm, pairs_in_data_flow
from fmtransfer.backbone.weights import WeightsInfo, WeightsSource, load_weights, resolve_weights_source
from fmtransfer.errors import ConfigError

log = logging.getLogger(__name__)

PRE_LOGITS = "pre_logits"


@dataclass(frozen=True)
class LevelInfo:
    """One cacheable feature map: a ``feature_info`` level (index >= 0) or the pooled pre-logits vector."""

    name: str
    index: int | None
    module: str
    channels: int
    reduction: int | None

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "index": self.index,
            "module": self.module,
            "channels": self.channels,
            "reduction": self.reduction,
        }


def check_model_name(name: str) -> None:
    """Raise a ConfigError suggesting close names when ``name`` is not a timm model."""
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models() for valid names."
        raise ConfigError(f"backbone.name={name} is not a timm model.{hint}")


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone described by data, without its weights: levels, preprocessing config and weights source."""

    name: str
    levels: tuple[LevelInfo, ...]
    pretrained_cfg: dict
    weights: WeightsSource

    def create(self, drop_path_rate: float = 0.0) -> tuple[nn.Module, WeightsInfo]:
        """Build the model and load its weights (eval mode); ``drop_path_rate``: stochastic depth while training,
        for the models that have it (no parameters: the weights load the same)."""
        extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        model = timm.create_model(self.name, pretrained=False, **extra)
        info = load_weights(model, self.name, self.weights)
        return model.eval(), info


def describe_backbone(name: str, weights: str = "auto", checkpoint: str | None = None) -> BackboneSpec:
    """Describe ``name`` from an architecture built on the meta device (no memory, no weights loaded)."""
    check_model_name(name)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    cfg = dict(model.pretrained_cfg)
    source = resolve_weights_source(name, weights, checkpoint, hub_id=cfg.get("hf_hub_id"))
    return BackboneSpec(name, tuple(describe_levels(model)), cfg, source)


def describe_levels(model: nn.Module) -> list[LevelInfo]:
    """Every feature map the model can give: its ``feature_info`` levels, then ``pre_logits``."""
    levels = [
        LevelInfo(f"level{i}", i, f["module"], int(f["num_chs"]), int(f["reduction"]))
        for i, f in enumerate(model.feature_info)
    ]
    levels.append(LevelInfo(PRE_LOGITS, None, "forward_head(pre_logits=True)", int(model.num_features), None))
    return levels


def parse_levels(spec: str | int | Sequence[str | int], available: Sequence[LevelInfo]) -> list[LevelInfo]:
    """Resolve a level spec (``all``, ``pre_logits``, an index, ``levelN``, or a list of those) to ``LevelInfo``s."""
    by_name = {lv.name: lv for lv in available}
    if isinstance(spec, (str, int)):
        spec = [spec]
    chosen: list[LevelInfo] = []
    for item in spec:
        if item == "all":
            names = list(by_name)
        elif isinstance(item, int) or (isinstance(item, str) and item.lstrip("-").isdigit()):
            idx = int(item)
            n_maps = len(available) - 1
            if not -n_maps <= idx < n_maps:
                raise ConfigError(_unknown_level(item, available))
            names = [f"level{idx % n_maps}"]
        elif item in by_name:
            names = [item]
        else:
            raise ConfigError(_unknown_level(item, available))
        chosen.extend(by_name[n] for n in names if by_name[n] not in chosen)
    # Keep the network's order (shallow to deep) whatever order the user wrote.
    return sorted(chosen, key=lambda lv: available.index(lv))


def _unknown_level(item: object, available: Sequence[LevelInfo]) -> str:
    valid = ", ".join(f"{lv.name} ({lv.channels} ch, stride {lv.reduction})" for lv in available)
    return f"feature level {item!r} is not known for this backbone. Valid: all, integer indices, or {valid}."


class FeatureMapExtractor(nn.Module):
    """Runs a timm model once and returns the requested feature maps by level name.

    Spatial levels come from ``forward_intermediates`` (aligned with ``feature_info``); ``pre_logits`` is the
    model's own pooled vector before the classifier.
    """

    def __init__(self, model: nn.Module, levels: Sequence[LevelInfo]):
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise ConfigError(
                f"backbone {type(model).__name__} has no forward_intermediates in this timm version; "
                f"choose a model family that does (efficientnet, resnet, convnext, vit, ...)."
            )
        self.model = model
        self.levels = list(levels)
        self.indices = [lv.index for lv in self.levels if lv.index is not None]
        self.want_pre_logits = any(lv.name == PRE_LOGITS for lv in self.levels)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.want_pre_logits:
            final, maps = self.model.forward_intermediates(x, indices=self.indices or [0])
            pooled = self.model.forward_head(final, pre_logits=True)
            out[PRE_LOGITS] = pooled.flatten(1)
        else:
            maps = self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True, stop_early=True)
        if self.indices:
            out.update({f"level{i}": m for i, m in zip(self.indices, maps, strict=True)})
        return {lv.name: out[lv.name] for lv in self.levels}


def _inputs_channels_last(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous(memory_format=torch.channels_last) if _is_image_batch(a) else a for a in args)


def _is_image_batch(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 4


def to_channels_last(module: nn.Module) -> nn.Module:
    """``module`` (in place) with channels-last (NHWC) weights, its 4-D inputs converted as they arrive.

    On GPUs with tensor cores, NHWC convolutions skip the layout transposes NCHW needs. The parameter names and
    the outputs' values stay the same (up to float rounding), so checkpoints and caches are unaffected. Calling it
    again on the same module changes nothing.
    """
    module.to(memory_format=torch.channels_last)
    if _inputs_channels_last not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_inputs_channels_last)
    return module


class FrozenModule(nn.Module):
    """Wraps a module so it never trains: no gradients, and BatchNorm/dropout stay in eval mode.

    ``LightningModule.freeze()`` or ``requires_grad_(False)`` alone still lets ``.train()`` switch BatchNorm back to
    batch statistics and update its running buffers; overriding ``train`` closes that hole.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenModule:
        self.training = mode
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)


class FixedBatchNormStats(nn.Module):
    """Wraps a trainable module so its BatchNorm layers keep their pretrained running statistics.

    The weights (BatchNorm's affine parameters included) still train; only the statistics stay fixed, because
    batches of a few dozen images from a small dataset estimate them worse than ImageNet did (frozen-BN fine-tuning).
    ``fold``: each BatchNorm that directly follows a convolution is computed through that convolution's weight and
    bias (the same function and gradients, up to float rounding; ``convolution.py``).
    """

    def __init__(self, module: nn.Module, fold: bool = True):
        super().__init__()
        self.module = module
        self.fold_pending = fold
        self.fold_seconds = 0.0  # the fold's time: the model's one-time preparation (``preparation_seconds``)

    def train(self, mode: bool = True) -> FixedBatchNormStats:
        super().train(mode)
        for m in self.module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, *args, **kwargs):
        if self.fold_pending:
            self.fold_pending = False
            began = time.perf_counter()
            self._fold(args, kwargs)
            self.fold_seconds = time.perf_counter() - began
        return self.module(*args, **kwargs)

    def _fold(self, args: tuple, kwargs: dict) -> None:
        """With its statistics fixed, a BatchNorm is a per-channel affine map: folded into the convolution before it,
        the pair costs one pass over the activations instead of three. The pairs are confirmed on the data flow of a
        forward of the batch's first sample (no gradients, random state restored), so every real forward is folded."""
        first = [a[:1] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args]
        cuda = [a.device for a in first if isinstance(a, torch.Tensor) and a.is_cuda]
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=cuda[:1]),
            pairs_in_data_flow(conv_batchnorm_pairs(self.module)) as pairs,
        ):
            self.module(*first, **kwargs)
        log.debug("%d BatchNorm layers with fixed statistics folded into their convolutions", fold_batchnorm(pairs))


def preparation_seconds(module: nn.Module) -> float:
    """Seconds ``module``'s parts have spent so far preparing themselves on their first forward (the BatchNorm fold
    of ``FixedBatchNormStats``): a one-time cost of the model, whichever pass happened to pay it."""
    return sum(m.fold_seconds for m in module.modules() if isinstance(m, FixedBatchNormStats))
