"""The on-disk feature-map cache: one directory per (backbone, split, fingerprint), memory-mappable ``.npy`` files.

Layout::

    <root>/<backbone>/<split>-<key>/
        manifest.json      written last: an entry without it is incomplete and never read
        verified.json      each file's size and mtime when its checksum last passed (cache.verify=checksum)
        labels.npy         int64 [N]
        <level>.npy        [N, C, H, W] (or [N, C]) float16/float32, one per cached level

An entry is built in a hidden ``.partial-*`` sibling and renamed into place in one atomic step, under a per-key
file lock, so a killed extraction leaves only a partial directory (removed by the next builder) and two runs asking
for the same maps build them once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmtransfer.errors import CacheError
from fmtransfer.hashing import file_checksum, mapping_key

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VERIFIED = "verified.json"  # {file: [bytes, mtime_ns]} when the checksums last passed: unchanged files skip hashing
LABELS = "labels"


def fingerprint_key(parts: Mapping) -> str:
    """A short stable hash of every input that changes the cached features."""
    return mapping_key(parts)


@dataclass
class CachedSplit:
    """A complete cache entry; arrays open memory-mapped (read-only), so a large cache costs no RAM until read."""

    path: Path
    manifest: dict

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def level_names(self) -> list[str]:
        return list(self.manifest["levels"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    def level(self, name: str) -> np.ndarray:
        if name not in self.manifest["levels"]:
            raise CacheError(f"level {name!r} is not in the cache {self.path} (it holds {self.level_names}).")
        return np.load(self.path / self.manifest["levels"][name]["file"], mmap_mode="r")

    def load(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Level ``name`` read whole into memory (into ``out`` if given: same shape and dtype).

        Plain ``read`` calls rather than copying from the memory map: no page fault per 4 KiB of the file.
        """
        if name not in self.manifest["levels"]:
            raise CacheError(f"level {name!r} is not in the cache {self.path} (it holds {self.level_names}).")
        path = self.path / self.manifest["levels"][name]["file"]
        with open(path, "rb", buffering=0) as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = header(f)
            if out is None:
                out = np.empty(shape, dtype)
            elif out.shape != shape or out.dtype != dtype:
                raise CacheError(f"cannot read level {name!r} {shape} {dtype} into {out.shape} {out.dtype}.")
            view = memoryview(out.reshape(-1).view(np.uint8))
            done = 0
            while done < len(view):  # a read returns at most ~2 GiB on Linux
                n = f.readinto(view[done:])
                if not n:
                    raise CacheError(f"{path} ended after {done} of {len(view)} bytes; the cache entry is damaged.")
                done += n
        return out

    def labels(self) -> np.ndarray:
        return np.load(self.path / self.manifest["labels"]["file"])


class FeatureCache:
    """Finds, validates, locks and atomically publishes cache entries under ``root``."""

    def __init__(self, root: str | Path, verify: str = "checksum"):
        if verify not in ("checksum", "size"):
            raise CacheError(f"cache.verify={verify} must be 'checksum' or 'size'.")
        self.root = Path(root).expanduser()
        self.verify = verify

    def entry_dir(self, backbone: str, split: str, key: str) -> Path:
        return self.root / safe_name(backbone) / f"{split}-{key}"

    def find(self, backbone: str, split: str, parts: Mapping, levels: list[str]) -> CachedSplit | None:
        """The complete, valid entry for these parts, or one whose levels are a superset of ``levels``."""
        exact = self.entry_dir(backbone, split, fingerprint_key(parts))
        candidates = [exact]
        folder = self.root / safe_name(backbone)
        if folder.is_dir():
            candidates += sorted(p for p in folder.glob(f"{split}-*") if p != exact and p.is_dir())
        for path in candidates:
            manifest = self.read_manifest(path)
            if manifest is None:
                continue
            other = {k: v for k, v in manifest["parts"].items() if k != "levels"}
            mine = {k: v for k, v in json.loads(json.dumps(parts, default=str)).items() if k != "levels"}
            if other != mine or not set(levels) <= set(manifest["levels"]):
                continue
            problem = self.validate(path, manifest)
            if problem is None:
                return CachedSplit(path, manifest)
            log.warning(f"discarding damaged entry {path}: {problem}")
            shutil.rmtree(path, ignore_errors=True)
        return None

    def validate(self, path: Path, manifest: dict) -> str | None:
        """``None`` if every file is present with its recorded size (and checksum); otherwise what is wrong.

        Checksums are computed once per entry: after they pass, ``verified.json`` records each file's size and
        mtime, and a later hit re-hashes only the files whose size or mtime changed since.
        """
        files = [manifest["labels"], *manifest["levels"].values()]
        stats = {}
        for f in files:
            p = path / f["file"]
            if not p.is_file():
                return f"{f['file']} is missing"
            stat = p.stat()
            if stat.st_size != f["file_bytes"]:
                return f"{f['file']} has {stat.st_size} bytes, manifest says {f['file_bytes']}"
            stats[f["file"]] = [stat.st_size, stat.st_mtime_ns]
        if self.verify != "checksum":
            return None
        verified = read_verified(path)
        for f in files:
            if verified.get(f["file"]) != stats[f["file"]] and file_checksum(path / f["file"]) != f["checksum"]:
                return f"{f['file']} does not match its checksum (corrupted after it was written)"
        if verified != stats:
            write_verified(path, stats)
        return None

    @staticmethod
    def read_manifest(path: Path) -> dict | None:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        ok = manifest.get("format_version") == FORMAT_VERSION and manifest.get("complete") is True
        return manifest if ok else None

    @contextlib.contextmanager
    def lock(self, backbone: str, split: str, key: str) -> Iterator[None]:
        """Exclusive per-entry lock (``flock``): concurrent builders of the same maps wait for one another."""
        folder = self.root / safe_name(backbone)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / f".{split}-{key}.lock", "a+")  # noqa: SIM115 - held for the with-block
        except OSError as exc:
            raise CacheError(
                f"cannot write the feature cache under {folder} ({exc.strerror}). Set cache.dir to a writable "
                f"directory, e.g. cache.dir=/tmp/fmtransfer-cache."
            ) from exc
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def remove_partials(self, backbone: str, split: str, key: str) -> None:
        """Delete leftovers of interrupted builds of this entry (call while holding its lock)."""
        for p in (self.root / safe_name(backbone)).glob(f".partial-{split}-{key}-*"):
            shutil.rmtree(p, ignore_errors=True)

    def writer(self, backbone: str, split: str, key: str) -> CacheEntryWriter:
        final = self.entry_dir(backbone, split, key)
        partial = final.parent / f".partial-{split}-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        return CacheEntryWriter(partial, final)


def read_verified(path: Path) -> dict:
    """An entry's ``verified.json`` (``{}`` when absent or unreadable: everything is hashed)."""
    try:
        return json.loads((path / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}


def write_verified(path: Path, stats: dict) -> None:
    """Record the verified files' size and mtime, atomically; a read-only cache just hashes again next time."""
    tmp = path / f".{VERIFIED}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(stats))
        tmp.replace(path / VERIFIED)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.debug(f"cannot record the verified checksums of {path}: {exc}")


class CacheEntryWriter:
    """Builds one entry in a partial directory; ``publish`` verifies completeness and renames it into place."""

    def __init__(self, partial: Path, final: Path):
        self.partial = partial
        self.final = final
        self.arrays: dict[str, np.memmap] = {}
        self.written: np.ndarray | None = None
        self.labels: np.ndarray | None = None

    def create(self, num_samples: int, shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype) -> None:
        """Pre-allocate one memory-mapped array per level (``shapes`` are per sample)."""
        try:
            self.partial.mkdir(parents=True)
            for name, shape in shapes.items():
                self.arrays[name] = np.lib.format.open_memmap(
                    self.partial / f"{safe_name(name)}.npy", mode="w+", dtype=dtype, shape=(num_samples, *shape)
                )
        except OSError as exc:
            self.abort()
            raise CacheError(f"cannot create cache files in {self.partial.parent}: {exc}") from exc
        self.labels = np.full(num_samples, -1, dtype=np.int64)
        self.written = np.zeros(num_samples, dtype=bool)

    def write(self, indices: np.ndarray, labels: np.ndarray, maps: Mapping[str, np.ndarray]) -> None:
        """Store one batch at ``indices`` (order-free, so duplicate writes from padded samplers are harmless)."""
        try:
            for name, arr in maps.items():
                self.arrays[name][indices] = arr
        except OSError as exc:
            raise CacheError(f"writing the feature cache in {self.partial} failed: {exc}") from exc
        self.labels[indices] = labels
        self.written[indices] = True

    def publish(self, manifest: dict) -> Path:
        """Check every sample was written, checksum, write the manifest last, fsync and rename into place."""
        missing = np.flatnonzero(~self.written)
        if len(missing):
            raise CacheError(
                f"extraction wrote {len(self.written) - len(missing)} of {len(self.written)} samples; "
                f"first missing index {int(missing[0])}. The partial cache was not published."
            )
        try:
            np.save(self.partial / f"{LABELS}.npy", self.labels)
            for arr in self.arrays.values():
                arr.flush()
            self.arrays.clear()  # close the memmaps before hashing and renaming
            manifest = dict(manifest, format_version=FORMAT_VERSION, complete=True)
            manifest["labels"] = self._file_record(f"{LABELS}.npy")
            for name, rec in manifest["levels"].items():
                rec.update(self._file_record(f"{safe_name(name)}.npy"))
            write_json_durably(self.partial / MANIFEST, manifest)
            _fsync_dir(self.partial)
            if FeatureCache.read_manifest(self.final) is not None:
                # Someone published the same entry (same inputs, same content); keep theirs.
                shutil.rmtree(self.partial, ignore_errors=True)
            else:
                # An incomplete directory in the final place (left by a crash) is never kept.
                shutil.rmtree(self.final, ignore_errors=True)
                os.replace(self.partial, self.final)
                _fsync_dir(self.final.parent)
        except OSError as exc:
            self.abort()
            raise CacheError(
                f"publishing the feature cache {self.final} failed: {exc}. Nothing was published."
            ) from exc
        return self.final

    def abort(self) -> None:
        self.arrays.clear()
        shutil.rmtree(self.partial, ignore_errors=True)

    def _file_record(self, filename: str) -> dict:
        path = self.partial / filename
        return {"file": filename, "file_bytes": path.stat().st_size, "checksum": file_checksum(path)}


def write_json_durably(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
