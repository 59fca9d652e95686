"""Keep command output to what a person reads: Lightning's per-Trainer info lines and known warnings go."""

from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
