"""The LightningModule that trains a head (on cached features, or on a live backbone's features)."""

from __future__ import annotations

import math
from functools import partial

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from fmtransfer.errors import ConfigError, FmtransferError
from fmtransfer.metrics import classification_metrics, per_class_metrics


class NonFiniteLossError(FmtransferError):
    """The training loss became NaN or infinite."""


class HeadClassifier(pl.LightningModule):
    """Cross-entropy training of ``head``; logs loss and the three metrics for val and test.

    ``features`` maps a batch's inputs to the head's input: absent for cached features, a frozen backbone when the
    backbone runs live, or a trainable (part of a) backbone in the partial/finetune/scratch regimes. Its trainable
    parameters get ``backbone_lr`` (default: ``lr``), each tensor in its own optimiser group with ``per_tensor_lr``
    (tagged ``auto_rgn``, for ``RelativeGradNormLR``). ``optimizer`` is a name in timm's optimizer registry
    (``adamw``; ``momentum``: SGD with momentum 0.9, as LP-FT's paper fine-tunes). The test confusion matrix is kept
    in ``test_confusion``.
    """

    def __init__(
        self,
        head: nn.Module,
        num_classes: int,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 50,  # the cosine schedule's horizon (a refit may stop before it)
        label_smoothing: float = 0.0,
        features: nn.Module | None = None,
        backbone_lr: float | None = None,
        warmup_epochs: float = 0.0,
        layer_decay: float | None = None,
        per_tensor_lr: bool = False,
        optimizer: str = "adamw",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["head", "features"])
        self.head = head
        self.features = features
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.test_confusion_metric = MulticlassConfusionMatrix(num_classes)
        self.test_per_class_metrics = per_class_metrics(num_classes)
        self.test_per_class: dict[str, list[float]] | None = None  # precision/recall/f1 per class, support
        self.test_confusion: list[list[int]] | None = None
        # Per-image test outputs, in test-split order (single process): {"label": (n,), "prob": (n, classes)}.
        self.test_predictions: dict[str, torch.Tensor] | None = None
        self._test_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        # The last validation's per-image outputs, in validation-split order (single process), same form.
        self.val_predictions: dict[str, torch.Tensor] | None = None
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        # The sanity check's validation metrics (``val/loss`` and the three), computed here: Lightning discards what a
        # sanity check logs and registers every logged key again for the first epoch, so logging it is wasted work.
        self.sanity_metrics: dict[str, float] | None = None
        self._sanity_loss = torch.zeros(2)  # summed loss, images

    def forward(self, inputs) -> torch.Tensor:
        return self.head(self.features(inputs) if self.features is not None else inputs)

    def _loss(self, batch):
        inputs, labels = batch[0], batch[1]
        logits = self(inputs) if self.training else self._evaluate(inputs)
        return logits, labels, F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)

    def _evaluate(self, inputs) -> torch.Tensor:
        """Evaluation logits; with a backbone in the module, a batch is padded to a power-of-two number of rows (its
        last row repeated) and the padding's logits dropped: a process then runs each convolution at a handful of
        batch shapes, compiled once each (oneDNN on a CPU), rather than at every fold's own last-batch size. In
        evaluation mode every row is computed independently of the others."""
        rows = len(inputs) if isinstance(inputs, torch.Tensor) else 0
        padded = 1 << max(rows - 1, 0).bit_length()
        if self.features is None or not rows or padded == rows:
            return self(inputs)
        return self(torch.cat([inputs, inputs[-1:].expand(padded - rows, *inputs.shape[1:])]))[:rows]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        _, labels, loss = self._loss(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                f"lower head.lr (now {self.hparams.lr}) or check the inputs for NaN/inf."
            )
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(labels), sync_dist=True)
        return loss

    def on_train_epoch_start(self) -> None:
        # The learning rate each epoch runs at (per-epoch schedule): a refit is checked against its folds' by it.
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("train/lr", lr, on_step=False, on_epoch=True, batch_size=1, sync_dist=False)

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []
        self._sanity_loss = torch.zeros(2, device=self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        sanity = self.trainer.sanity_checking
        logits, loss = self._eval_step(batch, self.val_metrics, "val/loss", log=not sanity)
        if sanity:
            self._sanity_loss += torch.stack(
                [loss.detach().float() * len(logits), loss.new_tensor(len(logits)).float()]
            )
        self._val_outputs.append((batch[1].detach().cpu(), logits.detach().float().softmax(-1).cpu()))

    def on_validation_epoch_end(self) -> None:
        outputs, self._val_outputs = self._val_outputs, []
        if self.trainer.world_size == 1 and outputs:
            labels, probs = zip(*outputs, strict=True)
            self.val_predictions = {"label": torch.cat(labels), "prob": torch.cat(probs)}
        if self.trainer.sanity_checking:
            loss_sum, count = self.trainer.strategy.reduce(self._sanity_loss, reduce_op="sum").tolist()
            metrics = {k: float(v) for k, v in self.val_metrics.compute().items()}  # synchronised across processes
            self.val_metrics.reset()
            self.sanity_metrics = {"val/loss": loss_sum / max(count, 1), **metrics} if count else None

    def test_step(self, batch, batch_idx: int) -> None:
        logits, _ = self._eval_step(batch, self.test_metrics, "test/loss")
        self.test_confusion_metric.update(logits, batch[1])
        self.test_per_class_metrics.update(logits, batch[1])
        self._test_outputs.append((batch[1].detach().cpu(), logits.detach().float().softmax(-1).cpu()))

    def on_test_epoch_start(self) -> None:
        self._test_outputs = []

    def on_test_epoch_end(self) -> None:
        self.test_confusion = self.test_confusion_metric.compute().tolist()
        self.test_confusion_metric.reset()
        values = {k: v.tolist() for k, v in self.test_per_class_metrics.compute().items()}
        self.test_per_class = {**values, "support": [sum(row) for row in self.test_confusion]}
        self.test_per_class_metrics.reset()
        # Under DDP each process saw an interleaved share of the test split: no per-image file then (the paired
        # statistics of make compare need one process; the metrics above are reduced across processes as usual).
        outputs, self._test_outputs = self._test_outputs, []
        if self.trainer.world_size == 1 and outputs:
            labels, probs = zip(*outputs, strict=True)
            self.test_predictions = {"label": torch.cat(labels), "prob": torch.cat(probs)}

    def _eval_step(self, batch, metrics, loss_name: str, log: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's logits and mean loss; ``metrics`` updated, and with ``log`` the loss and metrics logged."""
        logits, labels, loss = self._loss(batch)
        metrics.update(logits, labels)
        if log:
            self.log(loss_name, loss, on_step=False, on_epoch=True, batch_size=len(labels), sync_dist=True)
            self.log_dict(metrics, on_step=False, on_epoch=True)
        return logits, loss

    def _steps_per_epoch(self) -> int:
        """Optimiser steps per epoch of the attached Trainer (1 when none is attached, e.g. inspecting the
        optimiser, or when the data has no length: the schedule then moves once per step as if per epoch)."""
        try:
            trainer = self.trainer
        except RuntimeError:
            return 1
        steps = float(trainer.estimated_stepping_batches)
        return max(1, int(steps) // max(1, int(trainer.max_epochs or 1))) if math.isfinite(steps) else 1

    def configure_optimizers(self):
        # Optimisers only ever see trainable parameters; a trainable backbone part gets its own (lower) LR.
        groups = [{"params": [p for p in self.head.parameters() if p.requires_grad], "lr": self.hparams.lr}]
        if self.features is not None:
            groups += backbone_groups(
                self.features,
                self.hparams.lr if self.hparams.backbone_lr is None else self.hparams.backbone_lr,  # 0: not updated
                self.hparams.weight_decay,
                self.hparams.layer_decay,
                per_tensor=self.hparams.per_tensor_lr,
            )
        optimizer = create_optimizer(groups, self.hparams.optimizer, self.hparams.lr, self.hparams.weight_decay)
        steps_per_epoch = self._steps_per_epoch()
        factor = partial(
            lr_factor,
            steps_per_epoch=steps_per_epoch,
            warmup=float(self.hparams.warmup_epochs),
            horizon=max(1, self.hparams.max_epochs),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def create_optimizer(groups: list[dict], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """timm's optimizer ``name`` over ``groups`` (each keeps its own ``lr`` and ``weight_decay`` where it sets one)."""
    from timm.optim import create_optimizer_v2, list_optimizers

    if name not in list_optimizers():
        raise ConfigError(
            f"optimizer={name!r} is not in timm's optimizer registry; use adamw, momentum (SGD with momentum 0.9), "
            f"sgd (Nesterov) or another of timm.optim.list_optimizers()."
        )
    return create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=weight_decay, momentum=0.9)


def lr_factor(step: int, steps_per_epoch: int, warmup: float, horizon: int) -> float:
    """The learning-rate multiplier after ``step`` optimiser steps: linear warm-up over ``warmup`` epochs, then a
    cosine from 1 to 0 over ``horizon`` epochs, both in fractional epochs."""
    epoch = step / steps_per_epoch
    if warmup > 0 and epoch < warmup:
        return (step + 1) / (warmup * steps_per_epoch)
    return 0.5 * (1.0 + math.cos(math.pi * min(epoch, horizon) / horizon))


def backbone_groups(
    features: nn.Module, lr: float, weight_decay: float, layer_decay: float | None, per_tensor: bool = False
) -> list[dict]:
    """Optimiser groups of the trainable backbone parameters: one group at ``lr``; with ``per_tensor`` one group per
    tensor (``{"params": [p], "lr", "name", "auto_rgn": True}``); or with ``layer_decay`` timm's layer-wise groups
    (``param_groups_layer_decay``: timm's classifier layer at ``lr``, each layer below it ``layer_decay`` times lower;
    no weight decay on biases and norms) where ``features`` holds a timm model with a group matcher."""
    trainable = [p for p in features.parameters() if p.requires_grad]
    model = next((m for m in features.modules() if hasattr(m, "group_matcher")), None)
    if not trainable:
        return []
    if per_tensor:
        named = [(n, p) for n, p in features.named_parameters() if p.requires_grad]
        return [{"params": [p], "lr": lr, "name": n, "auto_rgn": True} for n, p in named]
    if layer_decay is None or model is None:
        return [{"params": trainable, "lr": lr}]
    from timm.optim import param_groups_layer_decay

    wanted = {id(p) for p in trainable}
    groups = []
    for g in param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=float(layer_decay)):
        params = [p for p in g["params"] if id(p) in wanted]
        if params:
            groups.append({"params": params, "lr": lr * g["lr_scale"], "weight_decay": g["weight_decay"]})
    covered = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in trainable if id(p) not in covered]
    return groups + ([{"params": rest, "lr": lr}] if rest else [])
