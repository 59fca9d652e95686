"""The CPU fast path where users feel it: a photo dataset's JPEGs at the backbone's own size (224 px for lite0).

Each mode (memory layout x precision) is measured side by side with NCHW fp32, today's path: the bare forward on
pre-decoded tensors, extraction end to end from the JPEGs (decode, preprocess, forward, pool, write), and a
training step of the whole backbone + a linear head (what finetune and scratch run).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch
from torch import nn

from fmtransfer.backbone import (
    PRE_LOGITS,
    FeatureMapExtractor,
    FixedBatchNormStats,
    LevelInfo,
    depthwise_backward_in_float32,
    to_channels_last,
)
from fmtransfer.bench.measure import (
    AUTOCAST_DTYPES,
    PredecodedImages,
    eval_loader,
    extraction_images_per_second,
    forward_images_per_second,
    predecoded_loader,
)
from fmtransfer.regimes import RunContext
from fmtransfer.training import Precision, cpu_has_native_bf16

MODES = {  # name -> (channels_last, precision)
    "nchw_fp32": (False, "32-true"),
    "nhwc_fp32": (True, "32-true"),
    "nhwc_bf16": (True, "bf16-mixed"),
}


def train_step_images_per_second(
    model: nn.Module,
    images: torch.Tensor,
    num_classes: int,
    precision: str,
    steps: int,
    batch_size: int,
    fold_batchnorm: bool = True,
) -> float:
    """Training throughput of the whole backbone + a linear head on ``pre_logits`` (forward, backward, AdamW step)
    under ``precision``'s autocast, as finetune runs it (pretrained BatchNorm statistics fixed, folded into the
    convolutions unless ``fold_batchnorm`` is false); the first step (allocation, kernel choice, folding) is not timed.
    A copy of ``model`` is trained, every parameter trainable (extraction leaves the backbone frozen)."""
    model = depthwise_backward_in_float32(copy.deepcopy(model).requires_grad_(True))
    pre_logits = LevelInfo(PRE_LOGITS, None, "", model.num_features, None)
    features = FixedBatchNormStats(FeatureMapExtractor(model, [pre_logits]), fold=fold_batchnorm).train()
    head = nn.Linear(model.num_features, num_classes)
    params = [*features.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    dtype = AUTOCAST_DTYPES.get(precision)
    labels = torch.arange(batch_size) % num_classes

    def step(batch: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(head(features(batch)[PRE_LOGITS]), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # Full batches, cycling through the images when there are fewer than (steps + 1) x batch_size.
    batches = [images[torch.arange(i * batch_size, (i + 1) * batch_size) % len(images)] for i in range(steps + 1)]
    step(batches[0])
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    return batch_size * (len(batches) - 1) / (time.perf_counter() - start)


def fast_path_figures(
    ctx: RunContext, model: nn.Module, cache_dir: Path, steps: int, batch_size: int, rounds: int = 2
) -> dict:
    """Every mode's three throughputs and their ratios to NCHW fp32; a mode this CPU cannot run natively (bf16
    without AVX512-BF16/AMX: emulated, slower than fp32) is listed under ``skipped`` with the reason. The training
    steps (BatchNorm folded and not) are measured in ``rounds`` rounds alternating over the modes, the fastest of each
    kept, so that a slow spell of a shared machine does not land on one mode."""
    native_bf16 = cpu_has_native_bf16()
    spec = ctx.cache_spec(ctx.spec.levels)
    jpeg_loader = eval_loader(ctx, "train", batch_size=64)
    predecoded = PredecodedImages(jpeg_loader)
    device = torch.device("cpu")
    modes, skipped, models = {}, {}, {}
    for name, (channels_last, precision) in MODES.items():
        if precision == "bf16-mixed" and not native_bf16:
            skipped[name] = "this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 would be emulated, slower than fp32"
            continue
        mode_model = copy.deepcopy(model).eval()
        if channels_last:
            to_channels_last(mode_model)
        tools = dataclasses.replace(
            ctx.tools,
            placement=dataclasses.replace(ctx.tools.placement, channels_last=channels_last),
            precision=Precision(precision, precision, "32-true"),
            extraction_kwargs={**ctx.tools.extraction_kwargs, "precision": precision, "enable_progress_bar": False},
        )
        mode_ctx = dataclasses.replace(ctx, tools=tools)
        with torch.inference_mode():  # one untimed batch: kernel choice and allocation are not throughput
            mode_model(predecoded.images[:8].contiguous())
        forward = forward_images_per_second(mode_model, predecoded_loader(predecoded, 64, False), device, precision)
        extract, _ = extraction_images_per_second(mode_ctx, mode_model, spec, cache_dir / name, "train")
        models[name] = (mode_model, precision)
        modes[name] = {
            "forward_predecoded_images_per_s": round(forward, 1),
            "extract_jpeg_images_per_s": round(extract, 1),
            "train_step_images_per_s": 0.0,
            "train_step_unfolded_images_per_s": 0.0,
        }
    for _ in range(rounds):
        for name, (mode_model, precision) in models.items():
            for key, fold in (("train_step_images_per_s", True), ("train_step_unfolded_images_per_s", False)):
                step = train_step_images_per_second(
                    mode_model, predecoded.images, ctx.data.num_classes, precision, steps, batch_size, fold
                )
                modes[name][key] = max(modes[name][key], round(step, 1))
    base = modes["nchw_fp32"]
    ratios = {
        name: {k.replace("_images_per_s", "_over_nchw_fp32"): round(v / base[k], 3) for k, v in m.items()}
        for name, m in modes.items()
        if name != "nchw_fp32"
    }
    for name, m in modes.items():  # the step as finetune runs it now against the step as it ran before (the old path)
        ratios.setdefault(name, {})["train_step_over_old_path"] = round(
            m["train_step_images_per_s"] / base["train_step_unfolded_images_per_s"], 3
        )
    return {
        "dataset": str(ctx.cfg.data.path),
        "image_size": list(ctx.data_config["input_size"]),
        "images": len(predecoded),
        "native_bf16": native_bf16,
        "modes": modes,
        "ratios": ratios,
        "skipped": skipped,
    }
