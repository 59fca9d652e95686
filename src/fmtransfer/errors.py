"""User-facing errors: each message names the file or option at fault and how to fix it."""

from __future__ import annotations


class FmtransferError(Exception):
    """An error caused by input or configuration; the CLI prints its message without a stack trace."""


class ConfigError(FmtransferError):
    """A configuration option has an invalid value."""


class DataError(FmtransferError):
    """The dataset cannot be loaded or split as asked."""


class WeightsError(FmtransferError):
    """Pretrained weights cannot be resolved or do not fit the model."""


class CacheError(FmtransferError):
    """The feature cache cannot be written or read."""
