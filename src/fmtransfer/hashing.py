"""Content hashes shared by the stages (weights identity, cache fingerprints and file checksums)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

CHUNK = 16 << 20


def file_checksum(path: str | Path) -> str:
    """BLAKE2b-128 of a file's bytes, read in chunks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def mapping_key(parts: Mapping, length: int = 8) -> str:
    """A short stable hash of a JSON-able mapping (key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=length).hexdigest()


def source_fingerprint(package_dir: str | Path | None = None, length: int = 8) -> str:
    """A short hash of this package's Python sources: results made by other code get another key."""
    root = Path(package_dir) if package_dir else Path(__file__).resolve().parent
    h = hashlib.blake2b(digest_size=length)
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()
