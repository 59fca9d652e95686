"""Where a CPU training step of the whole backbone goes, by op and by convolution kind, in fp32 and bf16 autocast.

    python scripts/train-step-profile.py [--model tf_efficientnet_lite0] [--size 224] [--batch 32]

Prints, for NHWC fp32 and NHWC bf16 (bf16 only where the CPU has it natively): the torch.profiler table of one
training step (forward, backward, AdamW) by self CPU time, then each convolution kind (depthwise, pointwise, other)
timed alone at the shapes it has inside the model, forward and backward. What docs/benchmarks.md reads from it.
"""

from __future__ import annotations

import argparse
import collections
import time

import timm
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fmtransfer.backbone import to_channels_last
from fmtransfer.training import cpu_has_native_bf16


def conv_kind(conv: nn.Conv2d) -> str:
    if conv.groups > 1:
        return "depthwise"
    return "pointwise" if conv.kernel_size == (1, 1) else "other"


def profile_step(model: nn.Module, x: torch.Tensor, bf16: bool, rows: int) -> str:
    """The profiler table of one training step after an untimed one."""
    labels = torch.arange(len(x)) % 2
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=36)


def conv_times(model: nn.Module, x: torch.Tensor, bf16: bool) -> dict[str, list[float]]:
    """Seconds of forward and backward of each convolution kind, each convolution alone at its input shape."""
    shapes: dict[str, torch.Size] = {}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    hooks = [
        m.register_forward_pre_hook(lambda _, a, n=n: shapes.setdefault(n, a[0].shape) and None)
        for n, m in convs.items()
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for name, conv in convs.items():
        inputs = torch.randn(shapes[name]).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        for _ in range(2):  # the first pass picks kernels and allocates; the second is kept
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                began = time.perf_counter()
                out = conv(inputs)
                forward = time.perf_counter() - began
            began = time.perf_counter()
            out.backward(torch.ones_like(out))
            backward = time.perf_counter() - began
        totals[conv_kind(conv)][0] += forward
        totals[conv_kind(conv)][1] += backward
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rows", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    modes = [False, True] if cpu_has_native_bf16() else [False]
    print(f"{args.model}, {args.size} px, batch {args.batch}, {torch.get_num_threads()} threads, NHWC")
    for bf16 in modes:
        model = to_channels_last(timm.create_model(args.model).train())
        print(
            f"\n== {'bf16 autocast' if bf16 else 'fp32'}: one training step\n{profile_step(model, x, bf16, args.rows)}"
        )
        for kind, (forward, backward) in sorted(conv_times(model, x, bf16).items()):
            print(f"{kind:>10} convolutions alone: forward {forward * 1e3:.0f} ms, backward {backward * 1e3:.0f} ms")
    if len(modes) == 1:
        print("\nbf16 not profiled: this CPU has no native bf16 (AVX512-BF16 or AMX)")


if __name__ == "__main__":
    main()
