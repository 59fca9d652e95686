"""Parameter-efficient regimes between frozen and full fine-tuning: BitFit, LoRA and surgical fine-tuning.

Each is the finetune regime (the pretrained backbone runs live on augmented images, LP-FT's probe start, the same fit
loop, selection, report, predict and export) with fewer of the backbone's parameters trained; which ones is
``backbone/tuning.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from fmtransfer.backbone.tuning import (
    add_lora,
    bias_and_norm_names,
    block_names,
    lora_layer_count,
    norm_names,
    parameter_blocks,
    train_only,
)
from fmtransfer.regimes.live import FinetuneRegime


def _trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class BitFitRegime(FinetuneRegime):
    """BitFit (Ben Zaken et al., ACL 2022): only the backbone's biases and normalisation parameters train."""

    name: ClassVar[str] = "bitfit"

    def tune(self, model: nn.Module) -> nn.Module:
        return train_only(model, bias_and_norm_names(model), "regime=bitfit (biases and normalisation parameters)")

    def tuned(self, model: nn.Module, results: dict) -> dict:
        return {"what": "biases and norms", "backbone_params": _trainable_count(model)}


@dataclass
class LoraRegime(FinetuneRegime):
    """LoRA (Hu et al., ICLR 2022) through Hugging Face peft: low-rank adapters on the target layers train, the
    backbone's own weights stay; export merges the adapters into plain weights."""

    name: ClassVar[str] = "lora"
    rank: int
    alpha: float
    dropout: float
    targets: str  # pointwise (every 1x1 convolution) or a regular expression over module names

    def tune(self, model: nn.Module) -> nn.Module:
        return add_lora(model, self.rank, self.alpha, self.dropout, self.targets)

    def tuned(self, model: nn.Module, results: dict) -> dict:
        what = f"LoRA rank {self.rank} on {lora_layer_count(model)} layers"
        return {"what": what, "backbone_params": _trainable_count(model)}


@dataclass
class SurgicalRegime(FinetuneRegime):
    """Surgical fine-tuning (Lee et al., ICLR 2023): one block of the backbone trains (``block``: first, last or an
    index of ``parameter_blocks``), or with ``auto`` every non-normalisation tensor at Auto-RGN's per-tensor rates."""

    name: ClassVar[str] = "surgical"
    block: str  # first | last | auto | an index of the model's blocks

    def auto_rgn(self) -> bool:
        return str(self.block) == "auto"

    def tune(self, model: nn.Module) -> nn.Module:
        if self.auto_rgn():
            norms = norm_names(model)
            names = [n for names in parameter_blocks(model).values() for n in names if n not in norms]
        else:
            names = block_names(model, self.block)[1]
        return train_only(model, names, f"regime.block={self.block}")

    def tuned(self, model: nn.Module, results: dict) -> dict:
        out = {"backbone_params": _trainable_count(model)}
        if not self.auto_rgn():
            return {"what": f"block {block_names(model, self.block)[0]}", **out}
        return {"what": "every block, Auto-RGN", **out, "auto_rgn": block_multipliers(model, results["auto_rgn"])}


def block_multipliers(model: nn.Module, multipliers: dict[str, float]) -> dict[str, float]:
    """Auto-RGN's mean learning-rate multiplier of each block's tensors (``multipliers``: by the trained module's
    parameter names, which end in the backbone's own)."""
    block_of = {name: block for block, names in parameter_blocks(model).items() for name in names}
    by_block: dict[str, list[float]] = {}
    for name, value in multipliers.items():
        parts = name.split(".")
        own = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in block_of), None)
        if own is not None:
            by_block.setdefault(block_of[own], []).append(value)
    return {block: round(sum(v) / len(v), 4) for block, v in by_block.items()}
