"""Shared by the entry points: fmtransfer's log lines, quiet library logging, and bad input as one clear line
instead of a traceback."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

from fmtransfer.errors import FmtransferError

LOG_LEVEL_ENV = "FMTRANSFER_LOG_LEVEL"  # debug | info (default) | warning | error


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record comes (a test's captured stream, a notebook's)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property always answers sys.stdout
        pass


class _StageFormatter(logging.Formatter):
    """``[stage] message``, the stage being the part of the flow that logged it (``fmtransfer.cache.extract``:
    ``cache``); warnings say so."""

    def format(self, record: logging.LogRecord) -> str:
        parts = record.name.split(".")
        stage = parts[1] if len(parts) > 1 and parts[0] == "fmtransfer" else parts[0]
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"[{stage}] {level}{record.getMessage()}"


def configure_logging(level: str | None = None) -> None:
    """fmtransfer's log lines on stdout at ``level`` (default: the ``FMTRANSFER_LOG_LEVEL`` environment variable, else
    info). The lines an entry point ends with (``run dir:``, ``report dir:``, ...) are printed at every level."""
    name = (level or os.environ.get(LOG_LEVEL_ENV) or "info").upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise FmtransferError(f"{LOG_LEVEL_ENV}={name.lower()}: use debug, info, warning or error.")
    logger = logging.getLogger("fmtransfer")
    for handler in [h for h in logger.handlers if isinstance(h, _StdoutHandler)]:
        logger.removeHandler(handler)
    handler = _StdoutHandler()
    handler.setFormatter(_StageFormatter())
    logger.addHandler(handler)
    logger.setLevel(name)
    logger.propagate = False  # Hydra's root handlers would print every line twice


def quiet_libraries() -> None:
    """fmtransfer's log lines configured (``configure_logging``); Lightning's per-Trainer info lines and known
    harmless warnings dropped."""
    configure_logging()
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
