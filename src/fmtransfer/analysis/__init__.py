"""Analysis stage: what cached feature maps hold and how well each depth transfers (reads caches only)."""

from fmtransfer.analysis.depth import transfer_by_depth

__all__ = ["transfer_by_depth"]
