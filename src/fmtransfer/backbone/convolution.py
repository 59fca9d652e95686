"""How a trainable backbone's convolutions compute on the CPU: depthwise backward in float32 under bf16 autocast,
and BatchNorm with fixed statistics folded into the convolution before it, with the clamping activation after that
BatchNorm applied in the convolution's output pass.

Both act by swapping a convolution's class for a subclass whose forward honours two per-instance settings, so
parameter names, checkpoints and outputs outside the settings' conditions stay as they were.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, Conv2dSame
from timm.layers.padding import pad_same
from torch import nn

log = logging.getLogger(__name__)

# Convolution and BatchNorm classes whose forward is known (the swapped subclasses reproduce it).
_CONVOLUTIONS = (nn.Conv2d, Conv2dSame)
_BATCHNORMS = (nn.BatchNorm2d, BatchNormAct2d)
# oneDNN applies a clamp in a CPU convolution's output pass (the op torch.compile fuses into for inference).
_FUSED_OUTPUT_PASS = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
_AMX = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


@dataclass(frozen=True)
class ClampActivation:
    """An activation that clamps (ReLU, ReLU6), as oneDNN applies it in a convolution's output pass (``attr`` and
    ``scalars`` of ``mkldnn._convolution_pointwise``), and its backward from the clamped output."""

    attr: str
    scalars: tuple[float, ...]

    def backward(self, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.attr == "relu":
            return torch.ops.aten.threshold_backward(grad, out, 0.0)
        return torch.ops.aten.hardtanh_backward(grad, out, *self.scalars)


# Activation classes a convolution may apply in its output pass: the same values bit for bit (tested).
CLAMP_ACTIVATIONS = {nn.ReLU: ClampActivation("relu", ()), nn.ReLU6: ClampActivation("hardtanh", (0.0, 6.0))}


class _CpuConvolution(torch.autograd.Function):
    """A CPU convolution in ``dtype`` (bf16 under autocast, as autocast computes it), with an optional clamping
    activation applied in its output pass (one pass over the output instead of two), and an optional float32
    backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, dtype, activation, float32_backward):
        ctx.conv = (stride, padding, dilation, groups)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.activation, ctx.float32_backward = activation, float32_backward
        x, low_weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            if activation is None:
                out = F.conv2d(x, low_weight, bias, stride, padding, dilation, groups)
            else:
                out = torch.ops.mkldnn._convolution_pointwise(
                    x, low_weight, bias, list(padding), list(stride), list(dilation), groups,
                    activation.attr, list(activation.scalars), "",
                )  # fmt: skip
        # a float32 backward takes the weight as given (the float32 convolution's gradients at the rounded input)
        ctx.save_for_backward(x, weight if float32_backward else low_weight, None if activation is None else out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        if ctx.activation is not None:
            grad = ctx.activation.backward(grad, out)
        if ctx.float32_backward:
            grad, x, weight = grad.float(), x.float(), weight.float()
        wanted = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.bias_sizes is not None and ctx.needs_input_grad[2],
        )
        grads = torch.ops.aten.convolution_backward(
            grad, x, weight, ctx.bias_sizes, stride, padding, dilation, False, [0, 0], groups, wanted
        )
        gx, gw, gb = (None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True))
        return gx, gw, gb, None, None, None, None, None, None, None


def _cpu_bf16_autocast(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


def _float32_channels_last(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """float32 fuses only channels-last, whose convolutions are oneDNN's anyway (NCHW ones may take other kernels)."""
    return x.dtype == weight.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)


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
    input through), and its ``fused_activation`` with it (in oneDNN's output pass on the CPU, else after the
    convolution)."""

    float32_backward = False
    folded_batchnorm: tuple[nn.BatchNorm2d, ...] = ()  # a tuple, so the BatchNorm is not registered twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, activation = self.weight, self.bias, None
        if self.folded_batchnorm and not self.folded_batchnorm[0].training:
            weight, bias = folded_weight_and_bias(self, self.folded_batchnorm[0])
            activation = self.folded_batchnorm[0].fused_activation
        padding = self.padding
        if isinstance(self, Conv2dSame):  # timm's TF-style "same" padding: pad as its forward does, then no padding
            x, padding = pad_same(x, self.kernel_size, self.stride, self.dilation), (0, 0)
        cpu = x.device.type == "cpu" and self.padding_mode == "zeros" and not isinstance(padding, str)
        bf16 = cpu and _cpu_bf16_autocast(x)
        float32_backward = self.float32_backward and bf16
        fused = cpu and activation is not None and _FUSED_OUTPUT_PASS and (bf16 or _float32_channels_last(x, weight))
        if float32_backward or fused:
            dtype = torch.bfloat16 if bf16 else x.dtype
            out = _CpuConvolution.apply(
                x, weight, bias, self.stride, padding, self.dilation, self.groups, dtype, activation if fused else None,
                float32_backward,
            )  # fmt: skip
        elif isinstance(self, Conv2dSame):
            out = F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)
        else:
            out = self._conv_forward(x, weight, bias)
        return out if activation is None or fused else self.folded_batchnorm[0].act(out)


class _FoldedBatchNorm:
    """Mixed into a BatchNorm's class: in eval mode its normalisation is done by the convolution before it, and its
    activation too where that is a clamp (``fused_activation``)."""

    fused_activation: ClampActivation | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        if self.fused_activation is not None:
            return x
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


def bf16_depthwise_backward_is_faster(conv: nn.Conv2d) -> bool:
    """Whether oneDNN's bf16 backward of this depthwise convolution measured faster than float32 on this CPU: for
    stride-1 3x3 ones on an Intel CPU with AMX (docs/benchmarks.md); float32 everywhere else, where it was measured
    faster (depthwise backward overall 2.5x slower in bf16 on an AVX512-BF16 EPYC without AMX)."""
    return _AMX and conv.stride == (1, 1) and conv.kernel_size == (3, 3)


def depthwise_backward_in_float32(module: nn.Module) -> nn.Module:
    """``module`` (in place) with its depthwise convolutions' backward in float32 under CPU bf16 autocast (all but
    those ``bf16_depthwise_backward_is_faster`` keeps in bf16): the forward output is autocast's, the gradients the
    float32 convolution's on the bf16-rounded tensors. Calling it again changes nothing."""
    for m in module.modules():
        if _known_convolution(m) and m.groups > 1:
            _swap_class(m, _TrainingConvolution)
            m.float32_backward = not bf16_depthwise_backward_is_faster(m)
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
    """Each pair's BatchNorm (in eval mode) computed through its convolution's weight and bias from now on, and its
    activation in the convolution's output pass where that is a clamp with nothing in between; the number folded."""
    for conv, bn in pairs:
        _swap_class(conv, _TrainingConvolution)
        _swap_class(bn, _FoldedBatchNorm)
        conv.folded_batchnorm = (bn,)
        if isinstance(bn, BatchNormAct2d) and type(bn.drop) is nn.Identity:
            bn.fused_activation = CLAMP_ACTIVATIONS.get(type(bn.act))
    return len(pairs)
