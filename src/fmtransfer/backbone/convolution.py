"""How a trainable backbone's convolutions compute on the CPU: depthwise backward in float32 under bf16 autocast,
and BatchNorm with fixed statistics folded into the convolution before it.

Both act by swapping a convolution's class for a subclass whose forward honours two per-instance settings, so
parameter names, checkpoints and outputs outside the settings' conditions stay as they were.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, Conv2dSame
from timm.layers.padding import pad_same
from torch import nn

log = logging.getLogger(__name__)

# Convolution and BatchNorm classes whose forward is known (the swapped subclasses reproduce it).
_CONVOLUTIONS = (nn.Conv2d, Conv2dSame)
_BATCHNORMS = (nn.BatchNorm2d, BatchNormAct2d)


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


def _cpu_bf16_autocast(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


def folded_weight_and_bias(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``conv`` followed by ``bn`` with its running statistics: bn(conv(x, W, b)) =
    conv(x, W * s, (b - mean) * s + beta) with s = gamma / sqrt(var + eps), differentiable in W, b, gamma and beta."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
    return conv.weight * scale.reshape(-1, 1, 1, 1), shift * scale + bn.bias


class _TrainingConvolution:
    """Mixed into a convolution's class. ``float32_backward``: a depthwise convolution whose backward runs in float32
    under CPU bf16 autocast (its forward stays bf16), because oneDNN's bf16 depthwise backward is the slow op of a CPU
    training step while its forward costs the same in both (docs/benchmarks.md). ``folded_batchnorm``: the BatchNorm
    after it, applied through the weight and bias while that BatchNorm is in eval mode (the BatchNorm then passes its
    input through)."""

    float32_backward = False
    folded_batchnorm: tuple[nn.BatchNorm2d, ...] = ()  # a tuple, so the BatchNorm is not registered twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.folded_batchnorm and not self.folded_batchnorm[0].training:
            weight, bias = folded_weight_and_bias(self, self.folded_batchnorm[0])
        padding = self.padding
        if isinstance(self, Conv2dSame):  # timm's TF-style "same" padding: pad as its forward does, then no padding
            x, padding = pad_same(x, self.kernel_size, self.stride, self.dilation), (0, 0)
        if (
            self.float32_backward
            and _cpu_bf16_autocast(x)
            and self.padding_mode == "zeros"
            and not isinstance(padding, str)
        ):
            return _ConvBf16Float32Backward.apply(x, weight, bias, self.stride, padding, self.dilation, self.groups)
        if isinstance(self, Conv2dSame):
            return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)
        return self._conv_forward(x, weight, bias)


class _FoldedBatchNorm:
    """Mixed into a BatchNorm's class: in eval mode its normalisation is done by the convolution before it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        return self.act(self.drop(x)) if isinstance(self, BatchNormAct2d) else x


_SWAPPED: dict[type, type] = {}


def _swap_class(module: nn.Module, mixin: type) -> None:
    cls = type(module)
    if issubclass(cls, mixin):
        return
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"{cls.__name__}{mixin.__name__.strip('_')}", (mixin, cls), {})
    module.__class__ = _SWAPPED[cls]


def _known_convolution(m: nn.Module) -> bool:
    return any(type(m) is c or (isinstance(m, _TrainingConvolution) and type(m).__mro__[2] is c) for c in _CONVOLUTIONS)


def depthwise_backward_in_float32(module: nn.Module) -> nn.Module:
    """``module`` (in place) with every depthwise convolution's backward in float32 under CPU bf16 autocast: its
    forward output is autocast's, its gradients the float32 convolution's on the bf16-rounded tensors. Calling it
    again changes nothing."""
    for m in module.modules():
        if _known_convolution(m) and m.groups > 1:
            _swap_class(m, _TrainingConvolution)
            m.float32_backward = True
    return module


def conv_batchnorm_pairs(module: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Candidates for folding: a convolution registered directly before a BatchNorm over its output channels, in the
    same parent (as timm builds its blocks), both of known classes, the BatchNorm affine with running statistics."""
    pairs = []
    for parent in module.modules():
        children = list(parent.children())
        for conv, bn in itertools.pairwise(children):
            if not (_known_convolution(conv) and type(bn) in _BATCHNORMS) or getattr(conv, "folded_batchnorm", ()):
                continue
            if bn.affine and bn.running_var is not None and bn.num_features == conv.out_channels:
                pairs.append((conv, bn))
    return pairs


@contextlib.contextmanager
def pairs_in_data_flow(
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]],
) -> Iterator[list[tuple[nn.Conv2d, nn.BatchNorm2d]]]:
    """Inside: a forward pass records which candidate BatchNorms receive exactly their convolution's output (the
    same tensor), and each exactly once; the yielded list holds those pairs when the block exits."""
    outputs: dict[nn.Module, list[torch.Tensor]] = {}
    confirmed: dict[nn.Module, list[bool]] = {}
    hooks = []
    for conv, bn in pairs:
        hooks.append(conv.register_forward_hook(lambda m, _, out: outputs.setdefault(m, []).append(out)))
        hooks.append(
            bn.register_forward_pre_hook(
                lambda m, args, conv=conv: confirmed.setdefault(m, []).append(
                    any(args[0] is out for out in outputs.get(conv, []))
                )
            )
        )
    found: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []
    try:
        yield found
    finally:
        for h in hooks:
            h.remove()
    found.extend((conv, bn) for conv, bn in pairs if confirmed.get(bn) == [True] and len(outputs.get(conv, [])) == 1)


def fold_batchnorm(pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> int:
    """Each pair's BatchNorm (in eval mode) computed through its convolution's weight and bias from now on; the
    number folded."""
    for conv, bn in pairs:
        _swap_class(conv, _TrainingConvolution)
        _swap_class(bn, _FoldedBatchNorm)
        conv.folded_batchnorm = (bn,)
    return len(pairs)
