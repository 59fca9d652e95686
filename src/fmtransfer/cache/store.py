"""The on-disk feature-map cache: one directory per (backbone, split, fingerprint), memory-mappable ``.npy`` files.

Layout::

    <root>/<backbone>/<split>-<key>/
        manifest.json      written last: an entry without it is incomplete and never read
        verified.json      each file's size and mtime when its checksum last passed (cache.verify=checksum)
        labels.npy         int64 [N]
        <level>.npy        [N, C, H, W] (or [N, C]) float16/float32, one per cached level

or, for a split made of rows of other entries (a cross-validation fold, a refit's pool), an index view::

    <root>/<backbone>/<split>-<key>/
        manifest.json      ``view.sources``: the entries (sibling folder names) its rows are read from
        labels.npy         int64 [N]
        rows.npy           int64 [N, 2]: (source, row in that source) of each of its rows

A view holds no maps: reading it reads its sources' rows, in chunks of at most ``read_chunk_mb``.

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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmtransfer.errors import CacheError
from fmtransfer.hashing import file_checksum, mapping_key

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VERIFIED = "verified.json"  # {file: [bytes, mtime_ns]} when the checksums last passed: unchanged files skip hashing
LABELS = "labels"
VIEW_ROWS = "rows"
USED = "used"  # its mtime: when the entry was last found or published (least-recently-used eviction)
PREDICT_PREFIX = "predict-"  # make predict's inputs: evicted before anything else
# Entries this process found or published: never evicted by it (a running comparison reads them memory-mapped).
_IN_USE: set[Path] = set()
READ_CHUNK_MB = 64  # default bound on the memory one chunked read of an entry takes (cache.read_chunk_mb)


def fingerprint_key(parts: Mapping) -> str:
    """A short stable hash of every input that changes the cached features."""
    return mapping_key(parts)


@dataclass
class CachedSplit:
    """A complete cache entry; arrays open memory-mapped (read-only), so a large cache costs no RAM until read.

    An index view (``is_view``) reads its rows from its source entries; ``chunks`` reads any entry in pieces of at
    most ``read_chunk_mb``, which is how readers that do not need a whole level at once should read it.
    """

    path: Path
    manifest: dict
    read_chunk_mb: float = READ_CHUNK_MB
    _sources: list[CachedSplit] | None = field(default=None, init=False, repr=False, compare=False)
    _view_rows: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path, read_chunk_mb: float = READ_CHUNK_MB) -> CachedSplit:
        """The complete entry at ``path`` (a view's sources opened lazily)."""
        manifest = FeatureCache.read_manifest(Path(path))
        if manifest is None:
            raise CacheError(f"{path} is not a complete cache entry (no valid {MANIFEST}).")
        return cls(Path(path), manifest, read_chunk_mb)

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def level_names(self) -> list[str]:
        return list(self.manifest["levels"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def is_view(self) -> bool:
        return "view" in self.manifest

    def sources(self) -> list[CachedSplit]:
        """A view's source entries, in ``rows.npy``'s numbering (a plain entry: none)."""
        if self._sources is None:
            names = self.manifest["view"]["sources"] if self.is_view else []
            self._sources = [CachedSplit.open(self.path.parent / n, self.read_chunk_mb) for n in names]
        return self._sources

    def view_rows(self) -> np.ndarray:
        """A view's ``[N, 2]`` (source, source row) table, read once (every chunked read slices it)."""
        if self._view_rows is None:
            self._view_rows = np.load(self.path / self.manifest["view"]["rows"]["file"])
        return self._view_rows

    def _check_level(self, name: str) -> dict:
        if name not in self.manifest["levels"]:
            raise CacheError(f"level {name!r} is not in the cache {self.path} (it holds {self.level_names}).")
        return self.manifest["levels"][name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Level ``name``'s array shape, ``(N, *per-sample shape)``."""
        return (self.num_samples, *self._check_level(name)["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self._check_level(name)["dtype"])

    def row_bytes(self, name: str) -> int:
        """Bytes of one row (image) of level ``name``."""
        return int(np.prod(self.shape(name)[1:])) * self.dtype(name).itemsize

    def rows_per_chunk(self, name: str) -> int:
        """How many rows of level ``name`` one chunked read takes (at least one)."""
        return max(1, int(self.read_chunk_mb * 2**20) // max(1, self.row_bytes(name)))

    def level(self, name: str) -> np.ndarray:
        """Level ``name``: memory-mapped for a plain entry; a view's rows gathered into memory (prefer ``chunks``)."""
        record = self._check_level(name)
        if self.is_view:
            return self.load(name)
        return np.load(self.path / record["file"], mmap_mode="r")

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of level ``name``, as an in-memory array."""
        if not self.is_view:
            return np.array(self.level(name)[start:stop])
        table = self.view_rows()[start:stop]
        out = np.empty((len(table), *self.shape(name)[1:]), self.dtype(name))
        for s, source in enumerate(self.sources()):
            mask = table[:, 0] == s
            if mask.any():
                wanted = table[mask, 1]
                order = np.argsort(wanted, kind="stable")  # ascending reads of the source's file
                picked = np.empty((len(wanted), *out.shape[1:]), out.dtype)
                picked[order] = source.level(name)[wanted[order]]
                out[mask] = picked
        return out

    def chunks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, rows)`` pieces of level ``name`` in order, each at most ``read_chunk_mb``."""
        step = self.rows_per_chunk(name)
        for start in range(0, self.num_samples, step):
            yield start, self.read_rows(name, start, min(start + step, self.num_samples))

    def load(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Level ``name`` read whole into memory (into ``out`` if given: same shape and dtype).

        Plain ``read`` calls rather than copying from the memory map: no page fault per 4 KiB of the file; a view
        is filled chunk by chunk from its sources.
        """
        record = self._check_level(name)
        if self.is_view:
            shape, dtype = self.shape(name), self.dtype(name)
            out = check_out(out, shape, dtype, name)
            for start, rows in self.chunks(name):
                out[start : start + len(rows)] = rows
            return out
        path = self.path / record["file"]
        with open(path, "rb", buffering=0) as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = header(f)
            out = check_out(out, shape, dtype, name)
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


def check_out(out: np.ndarray | None, shape: tuple, dtype: np.dtype, name: str) -> np.ndarray:
    """``out`` if it has ``shape`` and ``dtype``, a new array if None."""
    if out is None:
        return np.empty(shape, dtype)
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise CacheError(f"cannot read level {name!r} {tuple(shape)} {dtype} into {out.shape} {out.dtype}.")
    return out


class FeatureCache:
    """Finds, validates, locks and atomically publishes cache entries under ``root``."""

    def __init__(
        self,
        root: str | Path,
        verify: str = "checksum",
        read_chunk_mb: float = READ_CHUNK_MB,
        max_gb: float | None = None,
    ):
        if verify not in ("checksum", "size"):
            raise CacheError(f"cache.verify={verify} must be 'checksum' or 'size'.")
        if not is_positive_number(read_chunk_mb):
            raise CacheError(f"cache.read_chunk_mb={read_chunk_mb!r} must be a positive size in MiB (default 64).")
        if max_gb is not None and not is_positive_number(max_gb):
            raise CacheError(f"cache.max_gb={max_gb!r} must be a positive size in GiB, or null for no limit.")
        self.root = Path(root).expanduser()
        self.verify = verify
        self.read_chunk_mb = float(read_chunk_mb)
        self.max_gb = None if max_gb is None else float(max_gb)

    @classmethod
    def from_config(cls, cache: Mapping) -> FeatureCache:
        """The cache ``cache.*`` settings describe (``dir``, ``verify``, ``read_chunk_mb``, ``max_gb``)."""
        return cls(
            cache["dir"],
            cache.get("verify", "checksum"),
            cache.get("read_chunk_mb", READ_CHUNK_MB),
            cache.get("max_gb"),
        )

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
                mark_used(path)
                return CachedSplit(path, manifest, self.read_chunk_mb)
            log.warning(f"discarding damaged entry {path}: {problem}")
            shutil.rmtree(path, ignore_errors=True)
        return None

    def validate(self, path: Path, manifest: dict) -> str | None:
        """``None`` if every file is present with its recorded size (and checksum); otherwise what is wrong.

        Checksums are computed once per entry: after they pass, ``verified.json`` records each file's size and
        mtime, and a later hit re-hashes only the files whose size or mtime changed since.
        """
        view = manifest.get("view")
        files = [manifest["labels"], *([view["rows"]] if view else manifest["levels"].values())]
        if view and (problem := self.validate_sources(path, manifest)):
            return problem
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

    def validate_sources(self, path: Path, manifest: dict) -> str | None:
        """``None`` if every source of the view at ``path`` is the entry it was made from, complete and valid."""
        view = manifest["view"]
        for name, fingerprint in zip(view["sources"], view["fingerprints"], strict=True):
            source = self.read_manifest(path.parent / name)
            if source is None:
                return f"its source entry {name} is gone"
            if source["fingerprint"] != fingerprint or not set(manifest["levels"]) <= set(source["levels"]):
                return f"its source entry {name} is not the one it was made from"
            if problem := self.validate(path.parent / name, source):
                return f"its source entry {name}: {problem}"
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

    def entries(self) -> list[Path]:
        """Every complete-looking entry folder under the root (partial builds excluded)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("*/*") if p.is_dir() and not p.name.startswith("."))

    def evict(self, keep: Iterable[Path] = ()) -> list[Path]:
        """Remove least-recently-used entries until the cache holds at most ``max_gb`` (no limit: nothing).

        ``predict-*`` entries go first, then the others by when they were last found or published. Never removed:
        ``keep``, what this process has used, and an entry whose lock another process holds (being built). A view
        whose source goes goes with it. Returns the removed entries.
        """
        if self.max_gb is None:
            return []
        limit = self.max_gb * 2**30
        sizes = {p: folder_size(p) for p in self.entries()}
        total = sum(sizes.values()) + sum(folder_size(p) for p in self.root.glob("*/.partial-*"))
        protected = {Path(p) for p in keep} | _IN_USE
        removed: list[Path] = []
        order = sorted(sizes, key=lambda p: (not p.name.startswith(PREDICT_PREFIX), last_used(p)))
        for path in order:
            if total <= limit:
                break
            if path in protected or path in removed or not self.remove_unlocked(path):
                continue
            removed.append(path)
            total -= sizes[path]
            for view in self.views_of(path, sizes):
                if view not in protected and view not in removed and self.remove_unlocked(view):
                    removed.append(view)
                    total -= sizes[view]
        if removed:
            log.info(f"cache.max_gb={self.max_gb:g}: evicted {len(removed)} least recently used entries")
        if total > limit:
            log.warning(
                f"the feature cache {self.root} holds {total / 2**30:.2f} GiB, over cache.max_gb={self.max_gb:g}, "
                f"in entries in use or being built; raise cache.max_gb or remove entries by hand."
            )
        return removed

    @staticmethod
    def views_of(path: Path, entries: Iterable[Path]) -> list[Path]:
        """The index views among ``entries`` that read rows from ``path``."""
        views = []
        for entry in entries:
            manifest = FeatureCache.read_manifest(entry)
            if manifest and path.name in manifest.get("view", {}).get("sources", ()) and entry.parent == path.parent:
                views.append(entry)
        return views

    def remove_unlocked(self, path: Path) -> bool:
        """Remove entry ``path`` unless another process holds its lock; first renamed aside, so no reader ever
        sees it half-removed. True if it was removed."""
        split_key = path.name
        lock = path.parent / f".{split_key}.lock"
        try:
            handle = open(lock, "a+")  # noqa: SIM115 - closed below
        except OSError:
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
            try:
                aside = path.parent / f".evicted-{split_key}-{uuid.uuid4().hex[:8]}"
                os.replace(path, aside)
            except OSError:
                return False
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        shutil.rmtree(aside, ignore_errors=True)
        return True

    def writer(self, backbone: str, split: str, key: str) -> CacheEntryWriter:
        final = self.entry_dir(backbone, split, key)
        partial = final.parent / f".partial-{split}-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        return CacheEntryWriter(partial, final)


def is_positive_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def mark_used(path: Path) -> None:
    """Record that entry ``path`` was just used (its ``used`` file's mtime); a read-only cache is left as it is."""
    _IN_USE.add(path)
    with contextlib.suppress(OSError):
        (path / USED).touch()


def last_used(path: Path) -> float:
    """When entry ``path`` was last found or published (its manifest's mtime if it was never marked)."""
    for name in (USED, MANIFEST):
        with contextlib.suppress(OSError):
            return (path / name).stat().st_mtime
    return 0.0


def folder_size(path: Path) -> int:
    """Bytes of the files under ``path`` (files removed meanwhile by another process count 0)."""
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            total += p.stat().st_size if p.is_file() else 0
    return total


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


class LevelFile:
    """One level's ``.npy`` filled by positioned writes, not through a memory map: the pages written are the page
    cache's, never this process's resident memory, however large the entry."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype):
        header = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)  # header + (sparse) size
        self.offset = header.offset
        del header
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(shape[1:])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Rows ``values`` at ``indices``: each run of consecutive indices in one write."""
        indices = np.asarray(indices, dtype=np.int64)
        values = np.asarray(values, dtype=self.dtype).reshape(len(indices), *self.row_shape)
        if len(indices) > 1 and (np.diff(indices) < 0).any():
            order = np.argsort(indices, kind="stable")
            indices, values = indices[order], values[order]
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        for rows, block in zip(np.split(indices, breaks), np.split(values, breaks), strict=True):
            if len(rows):
                data = memoryview(np.ascontiguousarray(block)).cast("B")
                done = 0
                while done < len(data):
                    done += os.pwrite(self.fd, data[done:], self.offset + int(rows[0]) * self.row_bytes + done)

    def close(self, sync: bool = False) -> None:
        if self.fd >= 0:
            try:
                if sync:
                    os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1


class CacheEntryWriter:
    """Builds one entry in a partial directory; ``publish`` verifies completeness and renames it into place."""

    def __init__(self, partial: Path, final: Path):
        self.partial = partial
        self.final = final
        self.levels: dict[str, LevelFile] = {}
        self.written: np.ndarray | None = None
        self.labels: np.ndarray | None = None

    def create(self, num_samples: int, shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype) -> None:
        """Pre-allocate one array file per level (``shapes`` are per sample)."""
        try:
            self.partial.mkdir(parents=True)
            for name, shape in shapes.items():
                self.levels[name] = LevelFile(self.partial / f"{safe_name(name)}.npy", (num_samples, *shape), dtype)
        except OSError as exc:
            self.abort()
            raise CacheError(f"cannot create cache files in {self.partial.parent}: {exc}") from exc
        self.labels = np.full(num_samples, -1, dtype=np.int64)
        self.written = np.zeros(num_samples, dtype=bool)

    def write(self, indices: np.ndarray, labels: np.ndarray, maps: Mapping[str, np.ndarray]) -> None:
        """Store one batch at ``indices`` (order-free, so duplicate writes from padded samplers are harmless)."""
        try:
            for name, arr in maps.items():
                self.levels[name].write(indices, arr)
        except OSError as exc:
            raise CacheError(f"writing the feature cache in {self.partial} failed: {exc}") from exc
        self.labels[indices] = labels
        self.written[indices] = True

    def create_view(self, labels: np.ndarray, rows: np.ndarray) -> None:
        """An index view's files: its labels and its ``[N, 2]`` (source, source row) table; no maps."""
        try:
            self.partial.mkdir(parents=True)
            np.save(self.partial / f"{VIEW_ROWS}.npy", np.ascontiguousarray(rows, dtype=np.int64))
        except OSError as exc:
            self.abort()
            raise CacheError(f"cannot create cache files in {self.partial.parent}: {exc}") from exc
        self.labels = np.asarray(labels, dtype=np.int64)
        self.written = np.ones(len(labels), dtype=bool)

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
            for level in self.levels.values():
                level.close(sync=True)
            self.levels.clear()  # closed before hashing and renaming
            manifest = dict(manifest, format_version=FORMAT_VERSION, complete=True)
            manifest["labels"] = self._file_record(f"{LABELS}.npy")
            if "view" in manifest:
                manifest["view"] = {**manifest["view"], "rows": self._file_record(f"{VIEW_ROWS}.npy")}
            else:
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
            mark_used(self.final)
        except OSError as exc:
            self.abort()
            raise CacheError(
                f"publishing the feature cache {self.final} failed: {exc}. Nothing was published."
            ) from exc
        return self.final

    def abort(self) -> None:
        for level in self.levels.values():
            level.close()
        self.levels.clear()
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
