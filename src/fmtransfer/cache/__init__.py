"""Cache stage: extract feature maps once with a frozen backbone and keep them on disk, keyed by a fingerprint."""

from fmtransfer.cache.extract import (
    DTYPES,
    CacheResult,
    CacheSpec,
    FeatureExtractionModule,
    FeatureMapWriter,
    RowSource,
    cache_parts,
    ensure_feature_cache,
    extraction_manifest,
    map_shapes,
    pool_map,
)
from fmtransfer.cache.store import CachedSplit, CacheEntryWriter, FeatureCache, fingerprint_key

__all__ = [
    "DTYPES",
    "CacheEntryWriter",
    "CacheResult",
    "CacheSpec",
    "CachedSplit",
    "FeatureCache",
    "FeatureExtractionModule",
    "FeatureMapWriter",
    "RowSource",
    "cache_parts",
    "ensure_feature_cache",
    "extraction_manifest",
    "fingerprint_key",
    "map_shapes",
    "pool_map",
]
