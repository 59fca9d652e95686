"""Which of a backbone's parameters train: BitFit's biases and norms, surgical fine-tuning's blocks, LoRA adapters.

Each function changes a timm model in place (``requires_grad``, or adapters injected by Hugging Face ``peft``) and
returns it; the regimes stage decides which one a run applies.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from fmtransfer.errors import ConfigError

log = logging.getLogger(__name__)

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_names(model: nn.Module) -> set[str]:
    """The affine parameters of the normalisation layers."""
    return {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, NORM_TYPES)
        for name, _ in module.named_parameters(recurse=False)
    }


def bias_and_norm_names(model: nn.Module) -> list[str]:
    """The parameters BitFit trains: every bias, and the affine parameters of every normalisation layer."""
    norms = norm_names(model)
    return [n for n, _ in model.named_parameters() if n in norms or n.rsplit(".", 1)[-1] == "bias"]


def train_only(model: nn.Module, names: list[str], what: str) -> nn.Module:
    """``model`` with exactly the parameters ``names`` trainable (``what`` names them in errors)."""
    if not names:
        raise ConfigError(f"{what}: {type(model).__name__} has no such parameters to train.")
    wanted = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
    return model


def parameter_blocks(model: nn.Module) -> dict[str, list[str]]:
    """The model's parameters in blocks, in forward order, as timm's coarse ``group_matcher`` groups them
    (EfficientNet: ``stem``, ``blocks.0`` ... ``blocks.5``, ``blocks.6+conv_head+bn2``; ResNet: ``stem``, ``layer1``
    ... ``layer4``). The classifier, which the pre-logits heads never use, is left out."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        raise ConfigError(
            f"regime.block: {type(model).__name__} has no group_matcher, so its blocks are not known; choose a timm "
            f"model family that has one (efficientnet, resnet, convnext, vit)."
        )
    classifier = set()
    if hasattr(model, "get_classifier"):
        ids = {id(p) for p in model.get_classifier().parameters()}
        classifier = {n for n, p in model.named_parameters() if id(p) in ids}
    groups = group_parameters(model, model.group_matcher(coarse=True))
    ordered = [kept for _, names in sorted(groups.items()) if (kept := [n for n in names if n not in classifier])]
    return {("stem" if i == 0 else _block_label(names)): names for i, names in enumerate(ordered)}


def _block_label(names: list[str]) -> str:
    """A group's name: the dotted prefix its parameters share (``blocks.3``, ``layer2``), with the modules grouped
    in from elsewhere after a ``+`` (``blocks.6+conv_head+bn2``)."""
    first = names[0].split(".")[0]
    own = [n.split(".")[:-1] for n in names if n.split(".")[0] == first]
    common = []
    for parts in zip(*own, strict=False):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
        if parts[0].isdigit():  # blocks.0, not blocks.0.0: the block's index ends its name
            break
    others = dict.fromkeys(n.rsplit(".", 1)[0] for n in names if n.split(".")[0] != first)
    return "+".join([".".join(common) or first, *others])


def block_names(model: nn.Module, block: str | int) -> tuple[str, list[str]]:
    """(label, parameter names) of one block: ``first``, ``last`` or its index in ``parameter_blocks``."""
    blocks = parameter_blocks(model)
    labels = list(blocks)
    index = {"first": 0, "last": len(labels) - 1}.get(str(block), block)
    try:
        label = labels[int(index)]
    except (ValueError, IndexError):
        raise ConfigError(
            f"regime.block={block} is not a block of {type(model).__name__}; choose first, last, auto or an index "
            f"0-{len(labels) - 1} of {labels}."
        ) from None
    return label, blocks[label]


def _adaptable(module: nn.Module) -> bool:
    """A layer LoRA can adapt here: a linear layer or an ungrouped convolution (a depthwise convolution's adapter
    would have more parameters than the layer)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def pointwise_layer_names(model: nn.Module) -> list[str]:
    """The 1x1, ungrouped convolutions."""
    return [name for name, m in model.named_modules() if _adaptable(m) and getattr(m, "kernel_size", None) == (1, 1)]


def lora_targets(model: nn.Module, targets: str) -> list[str]:
    """The layer names LoRA adapts: ``pointwise`` (every 1x1 convolution) or a regular expression matched against
    the full module names of the linear layers and ungrouped convolutions."""
    if targets == "pointwise":
        names = pointwise_layer_names(model)
    else:
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise ConfigError(f"regime.targets={targets!r} is not a regular expression: {exc}.") from None
        names = [n for n, m in model.named_modules() if _adaptable(m) and pattern.fullmatch(n)]
    if not names:
        raise ConfigError(
            f"regime.targets={targets!r} matches no linear layer or ungrouped convolution of {type(model).__name__}; "
            f"use pointwise (the 1x1 convolutions) or a regular expression over its module names (e.g. "
            f"'blocks\\.6\\..*')."
        )
    return names


def lora_config(model: nn.Module, rank: int, alpha: float, dropout: float, targets: str):
    """peft's ``LoraConfig`` for ``model``'s target layers."""
    from peft import LoraConfig

    if int(rank) < 1:
        raise ConfigError(f"regime.rank={rank} must be at least 1.")
    return LoraConfig(
        r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=lora_targets(model, targets)
    )


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: str) -> nn.Module:
    """``model`` with LoRA adapters on its target layers (peft's custom-model support, injected in place: the
    module names stay, each adapted layer keeps its weights as ``base_layer``); only the adapters train.

    The adapters start at zero (peft's default ``lora_B``), so the adapted model starts as the pretrained one.
    """
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(lora_config(model, rank, alpha, dropout, targets), model)
    log.info(f"LoRA rank {rank} on {lora_layer_count(model)} layers")
    return model


def lora_layer_count(model: nn.Module) -> int:
    """How many of ``model``'s layers carry a LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """``model`` with every LoRA adapter merged into its layer's weights and the layer unwrapped (in place): a plain
    timm model, the same function up to float rounding."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in wrapped:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return model


def relative_grad_norms(params: list[torch.Tensor]) -> torch.Tensor:
    """Auto-RGN's learning-rate multipliers (Lee et al., ICLR 2023): each tensor's gradient norm over its weight
    norm, divided by the largest; 0 for a tensor without a gradient."""
    rgn = torch.stack(
        [
            (p.grad.detach().float().norm() / p.detach().float().norm().clamp_min(1e-12))
            if p.grad is not None
            else torch.zeros(())
            for p in params
        ]
    )
    return rgn / rgn.max().clamp_min(torch.finfo(torch.float32).tiny)
