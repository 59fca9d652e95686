"""Shared by the entry points: quiet library logging, and bad input as one clear line instead of a traceback."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

from fmtransfer.errors import FmtransferError


def quiet_libraries() -> None:
    """Drop Lightning's per-Trainer info lines and known harmless warnings."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print a ``FmtransferError`` (bad input or config) as ``error: ...`` and exit with status 2."""
    try:
        yield
    except FmtransferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
