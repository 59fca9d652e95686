"""Leakage check: test images that are copies of training (or validation) images, found before anything trains.

- **Exact** duplicates: the same file content (a hash of the encoded bytes).
- **Near** duplicates (resized, re-encoded, recompressed copies): the correlation of 32x32 grayscale thumbnails of the
  centre square (mean removed, unit norm), above ``threshold`` and not exact.

Why thumbnails and not the backbone's pre-logits: measured on the shared datasets (docs/leakage.md), a copy resized to
90 % and re-saved as JPEG quality 85 keeps a pre-logits cosine of only 0.764 with its original on UIUC textures, while
distinct photos of the same texture class reach 0.986, so no pre-logits threshold separates them; thumbnails keep
>= 0.998 for such copies and <= 0.977 (textures) / 0.815 (hymenoptera) for distinct same-class photos.

Each image is read once (hashed and decoded from the same bytes), in parallel threads, a batch of rows at a time;
JPEGs are decoded straight to grayscale by libjpeg-turbo (``simplejpeg`` when installed, the ``scale`` extra, else
torchvision: the same pixels), and thumbnails of one size are resized together.
Pairs are searched either densely, block by block (``BLOCK`` query rows against all reference rows: memory grows
with ``BLOCK x references``, time with ``queries x references``), or, for large splits, through a FAISS index
(``faiss-cpu``, an optional extra): thumbnails projected onto their 8 x 8 block averages (an orthogonal projection
never lengthens a distance, so every pair within the threshold's radius stays within it) in an inverted-file index,
range-searched, then every candidate pair checked on the full thumbnails. ``index=auto`` uses FAISS when it is
installed and the references number at least ``INDEX_MIN_REFERENCES``; docs/leakage.md has the measured speed and
recall against the dense search.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from fmtransfer.data.images import JPEG_MAGIC, encoded_bytes, map_undecoded, shared_workers
from fmtransfer.errors import ConfigError

try:  # the scale extra's JPEG decoder: libjpeg-turbo at about two thirds of torchvision's cost per small image
    import simplejpeg
except ImportError:
    simplejpeg = None

# FAISS's loader logs at INFO that it "could not load" builds the installed wheel does not ship (it then loads the
# one it does): not news to a user, and it reads like an error.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

THUMB = 32
BLOCK = 2048
DECODE_BYTES = 1 << 20  # encoded bytes a thread decodes in one call
RESIZE_PIXELS = 1 << 22  # decoded pixels a thread holds before it resizes them (4-megapixel photos: one at a time)
INDEX_GRID = 8  # the FAISS index holds each thumbnail's 8 x 8 block averages (64 dimensions)
INDEX_PROBES = 16  # inverted lists searched per query
INDEX_TRAIN_ITERATIONS = 5  # k-means iterations of the index's lists (FAISS's default, 25, costs more than it buys)
INDEX_TRAIN_PER_LIST = 64  # k-means points per list (FAISS warns below 39; its default sample, 256, costs 4x more)
INDEX_MIN_REFERENCES = 10_000  # index=auto: below this the dense search is fast enough and exact
INDEX_MODES = ("auto", "dense", "faiss")
DEFAULT_THRESHOLD = 0.99
# (held-out split, split it is checked against): the test split against every other split, validation against train.
CHECKS = (("test", "train"), ("test", "validation"), ("validation", "train"))
DEDUPE = ("off", "drop_from_test", "drop_from_train")


@dataclass(frozen=True)
class Pair:
    """Row ``row`` of ``split`` duplicates row ``other_row`` of ``other``."""

    split: str
    row: int
    other: str
    other_row: int
    kind: str  # exact | near
    score: float
    file: str = ""  # where known (images stored as paths)
    other_file: str = ""


@dataclass
class LeakageReport:
    """The pairs found (row indices of the splits as checked, before any dedupe) and what dedupe dropped."""

    threshold: float
    pairs: list[Pair] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {k: sum(p.kind == k for p in self.pairs) for k in ("exact", "near")}

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "pairs": [asdict(p) for p in self.pairs], "dropped": self.dropped}

    @classmethod
    def from_dict(cls, data: dict) -> LeakageReport:
        return cls(data["threshold"], [Pair(**p) for p in data["pairs"]], dict(data.get("dropped") or {}))

    def summary(self, limit: int = 3) -> str:
        """One line naming the first pairs, for the run's log."""
        c = self.counts()
        first = "; ".join(
            f"{p.split}[{p.row}] {p.kind} {p.other}[{p.other_row}]"
            + (f" ({Path(p.file).name} ~ {Path(p.other_file).name})" if p.file and p.other_file else "")
            for p in self.pairs[:limit]
        )
        return f"{c['exact']} exact and {c['near']} near-duplicate pair(s) across splits, e.g. {first}"


class ThumbnailRows:
    """``[n, THUMB*THUMB]`` thumbnails, read a range or a set of rows at a time as unit float32 rows: kept as
    given (float32 rows), or as uint8 ``thumbnail_levels`` (the check's own: a quarter of the bytes to hand back
    from a worker and to keep, ``normalized`` when read); in memory (``array``), or in an unnamed temporary file read
    by explicit reads, so that memory is what a caller reads, not the split; and their block averages (``coarse``,
    ``[n, INDEX_GRID**2]``, what the FAISS index holds, kept in memory)."""

    def __init__(self, n: int, array: np.ndarray | None = None, coarse: np.ndarray | None = None, levels: bool = False):
        self.n = n
        self.array = array
        self.levels = levels if array is None else array.dtype == np.uint8
        self.dtype = np.dtype(np.uint8 if self.levels else np.float32)
        self.row_bytes = THUMB * THUMB * self.dtype.itemsize
        self.file = tempfile.TemporaryFile() if array is None else None  # noqa: SIM115 - closed by close()
        self.coarse = np.zeros((n, INDEX_GRID * INDEX_GRID), dtype=np.float32) if coarse is None else coarse

    @classmethod
    def of(cls, thumbs: np.ndarray | ThumbnailRows) -> ThumbnailRows:
        if isinstance(thumbs, ThumbnailRows):
            return thumbs
        array = np.asarray(thumbs, np.float32)
        return cls(len(array), array, block_means(array))

    def __len__(self) -> int:
        return self.n

    def write(self, start: int, rows: np.ndarray, coarse: np.ndarray | None = None) -> None:
        """Rows (float32 thumbnails, or levels for a ``levels`` store) from row ``start`` on, with their block
        averages (computed here when not given)."""
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        self.coarse[start : start + len(data)] = block_means(self.unit(data)) if coarse is None else coarse
        if self.array is not None:
            self.array[start : start + len(data)] = data
            return
        view, done = memoryview(data).cast("B"), 0
        while done < len(view):
            done += os.pwrite(self.file.fileno(), view[done:], start * self.row_bytes + done)

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.unit(self.stored(start, stop))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed), each distinct row read once."""
        if self.array is not None:
            return self.unit(self.array[rows])
        wanted, inverse = np.unique(rows, return_inverse=True)
        out = np.empty((len(wanted), THUMB * THUMB), dtype=self.dtype)
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        done = 0
        for run in np.split(wanted, breaks):
            if len(run):
                out[done : done + len(run)] = self.stored(int(run[0]), int(run[-1]) + 1)
                done += len(run)
        return self.unit(out[inverse.ravel()])

    def stored(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` as kept (float32 rows or levels)."""
        stop = self.n if stop is None else min(stop, self.n)
        if self.array is not None:
            return self.array[start:stop]
        size = (stop - start) * self.row_bytes
        data = os.pread(self.file.fileno(), size, start * self.row_bytes) if size else b""
        if len(data) != size:
            raise OSError(f"thumbnail file: read {len(data)} of {size} bytes")
        return np.frombuffer(data, dtype=self.dtype).reshape(-1, THUMB * THUMB)

    def unit(self, rows: np.ndarray) -> np.ndarray:
        return normalized(rows) if self.levels else rows

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@dataclass
class Signatures:
    """What the check knows of each image of a split: a hash of its encoded bytes, its path ("" for images stored as
    bytes) and its thumbnail."""

    hashes: list[str]
    paths: list[str]
    thumbs: ThumbnailRows


def decode_grays(encoded: list[bytes]) -> list[torch.Tensor]:
    """Encoded images as ``[H, W]`` uint8 luma. JPEGs: libjpeg-turbo's grayscale output (their Y channel), by
    ``simplejpeg`` image by image when installed (16 against 24 us on a 64 px JPEG: less work around each call), else
    by torchvision in one call per list, which releases the GIL for the whole list (threads decode in parallel; PIL
    holds it for the Python around each image); the two give the same pixels. Anything else, or a JPEG libjpeg
    refuses, through PIL's ``convert("L")`` (the same luma weights)."""
    out: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, data in enumerate(encoded) if data[:3] == JPEG_MAGIC]
    if jpegs and simplejpeg is not None:
        for i in jpegs:
            out[i] = simplejpeg_gray(encoded[i])
    elif jpegs:
        try:
            tensors = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in jpegs]
            for i, gray in zip(jpegs, decode_jpeg(tensors, mode=ImageReadMode.GRAY), strict=True):
                out[i] = gray[0]
        except RuntimeError:  # an image of the list is refused: every one through PIL
            pass
    for i, gray in enumerate(out):
        if gray is None:
            with Image.open(io.BytesIO(encoded[i])) as image:
                out[i] = torch.from_numpy(np.array(image.convert("L")))
    return out


def simplejpeg_gray(data: bytes) -> torch.Tensor | None:
    """A grayscale or YCbCr JPEG's luma by ``simplejpeg``; ``None`` for one it refuses, and for CMYK/YCCK ones,
    whose gray it makes a level away from libjpeg's own conversion (torchvision's and PIL's)."""
    try:
        if simplejpeg.decode_jpeg_header(data)[2] not in ("Gray", "YCbCr"):
            return None
        return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="GRAY")[..., 0])
    except ValueError:
        return None


def thumbnail_levels(grays: list[torch.Tensor]) -> np.ndarray:
    """``[n, THUMB*THUMB]`` uint8: each image's centre square resized to ``THUMB`` x ``THUMB`` (antialiased
    bilinear on uint8 levels, as PIL's ``BILINEAR`` resize). Squares of one side are resized together, at most
    ``RESIZE_PIXELS`` input pixels a call."""
    out = torch.zeros(len(grays), THUMB * THUMB, dtype=torch.uint8)
    by_side: dict[int, list[int]] = {}
    for i, gray in enumerate(grays):
        by_side.setdefault(min(gray.shape), []).append(i)
    for side, rows in by_side.items():
        step = max(1, RESIZE_PIXELS // side**2)
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            squares = torch.stack([centre_square(grays[i]) for i in chunk])
            out.index_copy_(0, torch.tensor(chunk), resized_squares(squares).flatten(1))
    return out.numpy()


def resized_squares(squares: torch.Tensor) -> torch.Tensor:
    """``[n, side, side]`` uint8 -> ``[n, THUMB, THUMB]``, four squares at a time as the channels of one
    channels-last image: torch's vectorised uint8 antialiased resize takes 3- or 4-channel channels-last images
    only, and resizes each channel on its own (the same levels as one channel at a time)."""
    n, side = len(squares), squares.shape[-1]
    padded = torch.cat([squares, squares.new_zeros(-n % 4, side, side)])
    packed = padded.view(-1, 4, side, side).contiguous(memory_format=torch.channels_last)
    small = F.interpolate(packed, size=(THUMB, THUMB), mode="bilinear", antialias=True, align_corners=False)
    return small.contiguous().view(-1, THUMB, THUMB)[:n]


def normalized(levels: np.ndarray) -> np.ndarray:
    """Thumbnail levels as float32 rows with their mean removed and unit norm (flat images: all zeros)."""
    out = torch.from_numpy(np.array(levels, dtype=np.float32))  # a copy: rows read from a file are read-only
    out -= out.mean(dim=1, keepdim=True)
    norms = torch.linalg.vector_norm(out, dim=1, keepdim=True)
    return out.div_(torch.where(norms > 0, norms, 1.0)).numpy()


def centre_square(gray: torch.Tensor) -> torch.Tensor:
    h, w = gray.shape
    if h == w:
        return gray
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return gray[top : top + side, left : left + side]


def image_signatures(images: list[dict]) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Undecoded images (``{"bytes", "path"}``): each one's bytes read once, hashed and decoded; their hashes, paths
    ("" for images stored as bytes), thumbnail levels (``thumbnail_levels``, uint8: a quarter of the bytes of the
    ``normalized`` rows to hand back) and the thumbnails' block averages (``block_means``: made where the thumbnails
    are, in parallel). Images are decoded ``DECODE_BYTES`` of files at a
    time and resized once ``RESIZE_PIXELS`` decoded pixels have gathered: memory is bounded by those, not by the
    number or the size of the images."""
    hashes, parts, encoded, decoded = [], [], [], []
    encoded_size = decoded_size = 0
    for k, image in enumerate(images):
        data = encoded_bytes(image)
        hashes.append(hashlib.blake2b(data, digest_size=16).hexdigest())
        encoded.append(data)
        encoded_size += len(data)
        last = k == len(images) - 1
        if last or encoded_size >= DECODE_BYTES:
            grays = decode_grays(encoded)
            decoded += grays
            decoded_size += sum(gray.numel() for gray in grays)
            encoded, encoded_size = [], 0
        if last or decoded_size >= RESIZE_PIXELS:
            parts.append(thumbnail_levels(decoded))
            decoded, decoded_size = [], 0
    levels = np.concatenate([*parts, thumbnail_levels(decoded)])
    return hashes, [image.get("path") or "" for image in images], levels, block_means(normalized(levels))


def signatures(split: Dataset, workers: int | None = None) -> Signatures:
    """Every image's hash, path and thumbnail (``image_signatures`` in parallel, ``map_undecoded``), the thumbnails
    kept as levels; those of splits past ``INDEX_MIN_REFERENCES`` go to a file."""
    n = len(split)
    in_memory = np.zeros((n, THUMB * THUMB), dtype=np.uint8) if n < INDEX_MIN_REFERENCES else None
    thumbs = ThumbnailRows(n, in_memory, levels=True)
    hashes, paths = [], []
    for start, (chunk_hashes, chunk_paths, rows, coarse) in map_undecoded(split, image_signatures, workers):
        hashes += chunk_hashes
        paths += chunk_paths
        thumbs.write(start, rows, coarse)
    return Signatures(hashes, paths, thumbs)


def search_mode(index: str, references: int) -> str:
    """``dense`` or ``faiss`` for ``index`` (``data.leakage.index``) over ``references`` rows."""
    if index not in INDEX_MODES:
        raise ConfigError(f"data.leakage.index={index} is not known; choose one of {list(INDEX_MODES)}.")
    if index == "dense":
        return "dense"
    installed = importlib.util.find_spec("faiss") is not None
    if index == "faiss" and not installed:
        raise ConfigError(
            "data.leakage.index=faiss needs faiss-cpu: pip install 'fmtransfer[scale]' (or data.leakage.index=dense)."
        )
    return "faiss" if installed and (index == "faiss" or references >= INDEX_MIN_REFERENCES) else "dense"


def similar_pairs(
    queries: np.ndarray | ThumbnailRows,
    references: np.ndarray | ThumbnailRows,
    threshold: float,
    index: str = "dense",
) -> list[tuple[int, int, float]]:
    """``(query row, reference row, correlation)`` of every pair at or above ``threshold``, sorted (``index``:
    ``dense``, ``faiss`` or ``auto``; FAISS may miss a pair the dense search finds, never adds one below the
    threshold)."""
    queries, references = ThumbnailRows.of(queries), ThumbnailRows.of(references)
    if not len(queries) or not len(references):
        return []
    if search_mode(index, len(references)) == "faiss":
        return indexed_pairs(queries, references, threshold)
    everything = references.read()
    out = []
    for start in range(0, len(queries), BLOCK):
        scores = queries.read(start, start + BLOCK) @ everything.T
        rows, cols = np.nonzero(scores >= threshold)
        out += [(int(r) + start, int(c), float(scores[r, c])) for r, c in zip(rows, cols, strict=True)]
    return sorted(out)


def block_means(thumbs: np.ndarray) -> np.ndarray:
    """``[n, INDEX_GRID**2]``: thumbnails projected onto their ``INDEX_GRID`` x ``INDEX_GRID`` block averages, in an
    orthonormal basis (each block's sum over its side): an orthogonal projection, so no distance grows, and most
    of a thumbnail's energy is in its coarse structure (about 75 % on the scale benchmark's images)."""
    side = THUMB // INDEX_GRID
    squares = torch.from_numpy(np.ascontiguousarray(thumbs, dtype=np.float32)).view(-1, 1, THUMB, THUMB)
    return (F.avg_pool2d(squares, side) * side).flatten(1).numpy()


def index_lists(references: int) -> int:
    """Inverted lists for an index of ``references`` rows: 2 sqrt(n), at most one per 39 rows (FAISS's minimum of
    training points per list). Training costs about n_train x lists distances (as matrix products), a query
    ``INDEX_PROBES`` x n / lists (one by one); of sqrt(n), 2 sqrt(n) and 4 sqrt(n) lists this was the fastest on
    the scale benchmark's 100,000-image self-search and within its noise on its 20,000-image check."""
    return max(1, min(int(2 * np.sqrt(references)), references // 39))


def indexed_pairs(queries: ThumbnailRows, references: ThumbnailRows, threshold: float) -> list[tuple[int, int, float]]:
    """``similar_pairs`` through FAISS: the references' block averages (``ThumbnailRows.coarse``) in an inverted-file
    index, range-searched with the threshold's radius (unit vectors: correlation >= t <=> squared distance <=
    2 (1 - t), and the projection keeps every such pair within it), the candidates checked on the full thumbnails."""
    import faiss

    n = len(references)
    dims = INDEX_GRID * INDEX_GRID
    projected = references.coarse
    lists = index_lists(n)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dims), dims, lists)
    index.cp.niter = INDEX_TRAIN_ITERATIONS
    index.train(projected[np.sort(np.random.default_rng(0).permutation(n)[: INDEX_TRAIN_PER_LIST * lists])])
    index.add(projected)
    index.nprobe = min(INDEX_PROBES, lists)
    radius = 2.0 * (1.0 - threshold) + 1e-4  # a little slack: the candidates are checked exactly
    out = []
    for start in range(0, len(queries), BLOCK):
        block = queries.read(start, start + BLOCK)
        limits, _, found = index.range_search(queries.coarse[start : start + BLOCK], radius)
        rows = np.repeat(np.arange(len(block)), np.diff(limits).astype(np.int64))
        scores = np.einsum("ij,ij->i", block[rows], references.take(found)) if len(found) else np.zeros(0)
        keep = scores >= threshold
        out += [
            (int(r) + start, int(c), float(v)) for r, c, v in zip(rows[keep], found[keep], scores[keep], strict=True)
        ]
    return sorted(out)


def duplicate_groups(split: Dataset, threshold: float = DEFAULT_THRESHOLD, index: str = "auto") -> np.ndarray:
    """A group id per row of ``split``: rows that are exact or near copies of each other (the same tests as
    ``find_leakage``, within one split, transitively) share an id; every other row has its own. Cross-validation
    keeps a group in one fold, so no copy of a validation image is trained on."""
    found = signatures(split)
    hashes = found.hashes
    parent = list(range(len(split)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    pairs = [(first.setdefault(h, i), i) for i, h in enumerate(hashes)]
    try:
        pairs += [(i, j) for i, j, _ in similar_pairs(found.thumbs, found.thumbs, threshold, index) if i < j]
    finally:
        found.thumbs.close()
    for i, j in pairs:
        parent[root(j)] = root(i)
    roots = np.array([root(i) for i in range(len(split))], dtype=np.int64)
    return np.unique(roots, return_inverse=True)[1]


def find_leakage(
    splits: Mapping[str, Dataset],
    threshold: float = DEFAULT_THRESHOLD,
    index: str = "auto",
    sign: Callable[[Dataset], Signatures] = signatures,
) -> LeakageReport:
    """Exact and near duplicates for every check in ``CHECKS`` whose splits exist (near ones searched as ``index``
    says: ``auto``, ``dense`` or ``faiss``; each split's signatures made by ``sign``)."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"data.leakage.threshold={threshold} must be in (0, 1] (default {DEFAULT_THRESHOLD}).")
    search_mode(index, 0)  # a bad setting fails before any image is read
    # the search runs before the pool's workers exit: their teardown would stall FAISS's threads as it trains
    with shared_workers(sum(len(ds) for ds in splits.values())):
        found = {name: sign(ds) for name, ds in splits.items()}
        report = LeakageReport(threshold)
        for held, other in CHECKS:
            if held in found and other in found:
                report.pairs += split_pairs((held, found[held]), (other, found[other]), threshold, index)
    for signed in found.values():
        signed.thumbs.close()
    return report


def split_pairs(
    held: tuple[str, Signatures], other: tuple[str, Signatures], threshold: float, index: str
) -> list[Pair]:
    """The exact and near pairs of a held-out split's images (``(name, signatures)``) with another split's."""
    (held_name, mine), (other_name, theirs) = held, other
    shared = set(mine.hashes).intersection(theirs.hashes)
    by_hash: dict[str, list[int]] = {}
    for j, h in enumerate(theirs.hashes):
        if h in shared:
            by_hash.setdefault(h, []).append(j)
    exact = {(i, j) for i, h in enumerate(mine.hashes) if h in shared for j in by_hash[h]}
    pairs = [(i, j, "exact", 1.0) for i, j in sorted(exact)]
    near = similar_pairs(mine.thumbs, theirs.thumbs, threshold, index)
    pairs += [(i, j, "near", round(s, 6)) for i, j, s in near if (i, j) not in exact]
    return [
        Pair(held_name, i, other_name, j, kind, score, mine.paths[i], theirs.paths[j]) for i, j, kind, score in pairs
    ]


def dedupe(splits: dict[str, Dataset], report: LeakageReport, mode: str) -> dict[str, Dataset]:
    """``splits`` without the duplicated rows: ``drop_from_test`` removes the held-out side of every pair (test, or
    validation when checked against train), ``drop_from_train`` the other side; ``off`` keeps everything."""
    if mode not in DEDUPE:
        raise ConfigError(f"data.dedupe={mode} is not known; choose one of {list(DEDUPE)}.")
    if mode == "off" or not report.pairs:
        return splits
    drop: dict[str, set[int]] = {}
    for p in report.pairs:
        split, row = (p.split, p.row) if mode == "drop_from_test" else (p.other, p.other_row)
        drop.setdefault(split, set()).add(row)
    out = dict(splits)
    for split, rows in drop.items():
        out[split] = splits[split].select([i for i in range(len(splits[split])) if i not in rows])
        report.dropped[split] = len(rows)
    return out


def write_pairs(path: Path, report: LeakageReport) -> None:
    """The pairs as CSV: ``split,row,other_split,other_row,kind,score,file,other_file`` (rows as checked)."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "row", "other_split", "other_row", "kind", "score", "file", "other_file"])
        for p in report.pairs:
            writer.writerow([p.split, p.row, p.other, p.other_row, p.kind, p.score, p.file, p.other_file])
    tmp.replace(path)
