"""Backbones: a timm model, the feature maps it exposes (``feature_info`` levels + pooled pre-logits), freezing."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import nn

from fmtransfer.backbone.weights import WeightsInfo, WeightsSource, load_weights, resolve_weights_source
from fmtransfer.errors import ConfigError

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


class _ConvBf16Float32Backward(torch.autograd.Function):
    """A convolution computed in bf16 (as CPU autocast computes it) whose backward runs in float32."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.conv = (stride, padding, dilation, groups)
        ctx.x_dtype, ctx.bias_sizes = x.dtype, None if bias is None else list(bias.shape)
        x = x.to(torch.bfloat16)
        ctx.save_for_backward(x, weight)
        with torch.autocast("cpu", enabled=False):
            b = None if bias is None else bias.to(torch.bfloat16)
            return F.conv2d(x, weight.to(torch.bfloat16), b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        wanted = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.bias_sizes is not None and ctx.needs_input_grad[2],
        )
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad.float(), x.float(), weight.float(), ctx.bias_sizes, stride, padding, dilation, False, [0, 0], groups,
            wanted,
        )  # fmt: skip
        gx = gx.to(ctx.x_dtype) if gx is not None else None
        return gx, gw, gb, None, None, None, None


class _DepthwiseBackwardInFloat32:
    """Mixed into a depthwise convolution's class: under CPU bf16 autocast its forward stays bf16 and its backward runs
    in float32, because oneDNN's bf16 depthwise backward is the slow op of a CPU training step while its forward costs
    the same in both (docs/benchmarks.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        if x.device.type != "cpu" or not bf16 or isinstance(self.padding, str) or self.padding_mode != "zeros":
            return super().forward(x)
        padding = self.padding
        if isinstance(self, Conv2dSame):  # timm's TF-style "same" padding: pad as its forward does, then no padding
            x, padding = pad_same(x, self.kernel_size, self.stride, self.dilation), (0, 0)
        return _ConvBf16Float32Backward.apply(
            x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups
        )


_FAST_BACKWARD_CLASSES: dict[type, type] = {}


def depthwise_backward_in_float32(module: nn.Module) -> nn.Module:
    """``module`` (in place) with every depthwise convolution's backward in float32 under CPU bf16 autocast (its class
    swapped for a subclass: parameter names, checkpoints, forward outputs and everything outside CPU bf16 autocast
    stay the same). Calling it again changes nothing."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1 and not isinstance(m, _DepthwiseBackwardInFloat32):
            cls = type(m)
            if cls not in _FAST_BACKWARD_CLASSES:
                name = f"{cls.__name__}Float32Backward"
                _FAST_BACKWARD_CLASSES[cls] = type(name, (_DepthwiseBackwardInFloat32, cls), {})
            m.__class__ = _FAST_BACKWARD_CLASSES[cls]
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
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> FixedBatchNormStats:
        super().train(mode)
        for m in self.module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
