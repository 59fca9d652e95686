"""The LightningModule that trains a head (on cached features, or on a live backbone's features)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from fmtransfer.errors import FmtransferError
from fmtransfer.metrics import classification_metrics


class NonFiniteLossError(FmtransferError):
    """The training loss became NaN or infinite."""


class HeadClassifier(pl.LightningModule):
    """Cross-entropy training of ``head``; logs loss and the three metrics for val and test.

    ``features`` maps a batch's inputs to the head's input; identity for cached features, a frozen backbone for the
    live variant (the same head sees the same features either way).
    """

    def __init__(
        self,
        head: nn.Module,
        num_classes: int,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 50,
        label_smoothing: float = 0.0,
        features: nn.Module | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["head", "features"])
        self.head = head
        self.features = features
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")

    def forward(self, inputs) -> torch.Tensor:
        return self.head(self.features(inputs) if self.features is not None else inputs)

    def _loss(self, batch):
        inputs, labels = batch[0], batch[1]
        logits = self(inputs)
        return logits, labels, F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        _, labels, loss = self._loss(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                f"lower head.lr (now {self.hparams.lr}) or check the inputs for NaN/inf."
            )
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val/loss")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test/loss")

    def _eval_step(self, batch, metrics, loss_name: str) -> None:
        logits, labels, loss = self._loss(batch)
        metrics.update(logits, labels)
        self.log(loss_name, loss, on_step=False, on_epoch=True, batch_size=len(labels))
        self.log_dict(metrics, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.hparams.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
