"""Lightning callbacks that measure a run (wall time per training epoch, peak memory while it fits) or steer it
(Auto-RGN's per-tensor learning rates)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch

from fmtransfer.backbone.tuning import relative_grad_norms
from fmtransfer.training.allocator import heap_in_use_reader


class EpochTimer(pl.Callback):
    """Wall time of each training epoch (validation excluded), in ``seconds``; of each validation pass during fit
    (the sanity check excluded), in ``validation_seconds``."""

    def __init__(self):
        self.seconds: list[float] = []
        self.validation_seconds: list[float] = []
        self._t: float | None = None
        self._v: float | None = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        # A run resumed from a checkpoint saved after an epoch's last step starts at that epoch's end: not timed.
        if self._t is not None:
            self.seconds.append(time.perf_counter() - self._t)
        self._t = None

    def on_validation_epoch_start(self, trainer, pl_module):
        self._v = None if trainer.sanity_checking or trainer.state.fn != "fit" else time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._v is not None:
            self.validation_seconds.append(time.perf_counter() - self._v)
        self._v = None


class RelativeGradNormLR(pl.Callback):
    """Auto-RGN (Lee et al., ICLR 2023): before each optimiser step, every optimiser group tagged ``auto_rgn`` (one
    tensor each) gets its scheduled learning rate times its relative gradient norm over the largest one's
    (``relative_grad_norms``), so the tensors the data pulls at hardest train fastest, in one run instead of a sweep
    over blocks. The paper recomputes the multipliers each epoch from 5 extra batches; here each step's own gradients
    set them (no extra passes). ``mean_multipliers``: each tensor's mean over the steps, by name."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        groups = [g for g in optimizer.param_groups if g.get("auto_rgn")]
        if not groups:
            return
        weights = relative_grad_norms([g["params"][0] for g in groups]).tolist()
        for group, w in zip(groups, weights, strict=True):
            # The scheduler sets each group's rate afresh from its base rate every step: no compounding.
            group["lr"] = group["lr"] * w
            self.sums[group["name"]] = self.sums.get(group["name"], 0.0) + w
        self.steps += 1

    def mean_multipliers(self) -> dict[str, float]:
        return {name: total / max(1, self.steps) for name, total in self.sums.items()}


class BestEpoch(pl.Callback):
    """The number of epochs trained when ``monitor`` was last at its best on validation (0: never scored), which
    cross-validation averages into the epochs of the final training on the whole pool. Saved in checkpoints, so a
    resumed run keeps it."""

    def __init__(self, monitor: str, mode: str):
        self.monitor, self.mode = monitor, mode
        self.best_score: float | None = None
        self.epochs = 0
        self.metrics: dict[str, float] = {}  # every ``val/*`` metric of that validation

    def on_validation_end(self, trainer, pl_module):
        # Only validations during fit count (not the sanity check, nor trainer.validate calls before or after).
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.monitor not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[self.monitor])
        if self.best_score is None or (score < self.best_score if self.mode == "min" else score > self.best_score):
            self.best_score, self.epochs = score, trainer.current_epoch + 1
            self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "epochs": self.epochs, "metrics": self.metrics}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score, self.epochs = state_dict["best_score"], state_dict["epochs"]
        self.metrics = state_dict.get("metrics") or {}


class ValidationCurve(pl.Callback):
    """Every validation's per-image probabilities during fit, by epochs trained (0: the starting weights, added by
    the fit loop), so cross-validation can pool out-of-fold predictions at any epoch. Saved in checkpoints, so a
    resumed run keeps the epochs it validated before."""

    def __init__(self):
        self.probs: dict[int, torch.Tensor] = {}
        self.labels: torch.Tensor | None = None

    def add(self, epoch: int, predictions: dict[str, torch.Tensor] | None) -> None:
        if predictions is not None:
            self.probs[int(epoch)] = predictions["prob"].to(torch.float32)
            self.labels = predictions["label"]

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.add(trainer.current_epoch + 1, getattr(pl_module, "val_predictions", None))

    def state_dict(self) -> dict:
        return {"probs": self.probs, "labels": self.labels}

    def load_state_dict(self, state_dict: dict) -> None:
        # Merged: the start (epoch 0) is added before a resumed fit restores the epochs validated earlier.
        self.probs.update(state_dict["probs"])
        self.labels = state_dict["labels"]


class PeakMemory(pl.Callback):
    """Peak memory of ``trainer.fit`` (as a callback) or of a ``with`` block, above what was held at its start: the
    CUDA allocator's peak on a GPU; on a CPU with glibc the bytes held through ``malloc`` (``heap_in_use_reader``),
    sampled every 50 ms; elsewhere the process RSS, sampled every 20 ms from /proc.

    The heap figure counts this block's allocations even when they reuse memory an earlier run freed (a comparison's
    later runs), without handing that memory back to the OS first, which would make the block fault every page of
    its first batches in again. RSS cannot tell reused memory from new, so after a bigger run in the same process it
    underestimates. ``kind`` says which of the three ``peak_bytes`` is.
    """

    def __init__(self, device: str | torch.device | None = None):
        self.device = None if device is None else torch.device(device)
        self.peak_bytes = 0
        self.kind = "cpu_heap_in_use"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cuda = False
        self._read: Callable[[], int] = _rss_bytes
        self._interval = 0.02

    def start(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda" and torch.cuda.is_available()
        self.peak_bytes = 0
        if self._cuda:
            self.kind = "gpu_max_allocated"
            torch.cuda.reset_peak_memory_stats(device)
            return
        heap = heap_in_use_reader()
        # mallinfo2 walks the free lists under the arena's lock: sampled less often than /proc's cheap RSS figure
        self._read, self._interval = (heap, 0.05) if heap is not None else (_rss_bytes, 0.02)
        self.kind = "cpu_heap_in_use" if heap is not None else "cpu_rss_increase"
        self._start = self._read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._cuda:
            self.peak_bytes = int(torch.cuda.max_memory_allocated())
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.peak_bytes = max(self.peak_bytes, self._read() - self._start)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_bytes = max(self.peak_bytes, self._read() - self._start)

    def __enter__(self) -> PeakMemory:
        self.start(self.device or torch.device("cpu"))
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def on_fit_start(self, trainer, pl_module):
        self.start(trainer.strategy.root_device)

    def on_fit_end(self, trainer, pl_module):
        self.stop()

    def on_exception(self, trainer, pl_module, exception):
        self.stop()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
