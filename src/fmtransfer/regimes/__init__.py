"""Regimes stage: how much of the backbone is trained (frozen: nothing; heads learn from the cache)."""

from fmtransfer.regimes.frozen import cache_features, load_data, run_frozen, train_head

__all__ = ["cache_features", "load_data", "run_frozen", "train_head"]
