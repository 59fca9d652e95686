"""Images as tensors: colour-mode normalisation, a torch ``Dataset`` view of a split, and a split's identity."""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextvars import ContextVar
from typing import TypeVar

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"  # the first bytes of every JPEG file
READ_BATCH = 512  # rows of undecoded images read at a time (memory bounded by this, not by the split)
BATCHES_IN_FLIGHT = 2  # batches handed to the workers ahead of the one being collected
# Splits this long are mapped in forked processes: PIL and the Python around each image hold the GIL, so threads
# scale only as far as the decoder releases it; starting the processes costs more than a split of 2,048 small JPEGs.
PROCESS_MIN_ROWS = 4_096
T = TypeVar("T")
SHARED_POOL: ContextVar[Executor | None] = ContextVar("shared_workers", default=None)  # set by ``shared_workers``


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) as 8-bit RGB; transparent pixels composite onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: rescale to 8 bits rather than clipping everything above 255 to white.
        arr = np.asarray(image, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        image = Image.fromarray(np.rint(arr / hi * 255.0).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImageClassificationDataset(torch.utils.data.Dataset):
    """A split as ``(image_tensor, label, index)``; the index lets writers place outputs without relying on order.

    A transform with ``takes_index`` (a seeded view) is called with the row's index as well as its image.
    """

    def __init__(self, split: Dataset, transform: Callable[[Image.Image], torch.Tensor]):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        row = self.split[index]
        image = to_rgb(row["image"])
        if getattr(self.transform, "takes_index", False):
            return self.transform(image, index), int(row["label"]), index
        return self.transform(image), int(row["label"]), index


class EncodedImages(torch.utils.data.Dataset):
    """A split's images undecoded, as ``(uint8 tensor of the file's bytes, label, index)``: decoded later, batch by
    batch, where the model runs (``JpegEval``)."""

    def __init__(self, split: Dataset):
        self.raw = split.cast_column("image", ImageFeature(decode=False))

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        row = self.raw[index]
        return torch.frombuffer(bytearray(encoded_bytes(row["image"])), dtype=torch.uint8), int(row["label"]), index


def encoded_bytes(image: dict) -> bytes:
    """An undecoded image's bytes (``{"bytes", "path"}``), read from its file when not stored."""
    if image.get("bytes") is not None:
        return image["bytes"]
    return read_file(image["path"])


def read_file(path: str) -> bytes:
    """A file's bytes in as few system calls as it allows: for a small image, Python's buffered ``open().read()``
    costs twice the read itself (7.5 against 4.6 us on a 1.5 KB JPEG)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        parts = [os.read(fd, size + 1)]  # a regular file reads short only at its end
        while len(parts[0]) > size and parts[-1]:  # it grew since fstat: read on to its end
            parts.append(os.read(fd, 1 << 20))
    finally:
        os.close(fd)
    return b"".join(parts)


def map_undecoded(split: Dataset, fn: Callable[[list[dict]], T], workers: int | None = None) -> Iterator[tuple[int, T]]:
    """``fn`` over the undecoded images (``{"bytes", "path"}``) of ``split``, ``READ_BATCH`` rows read at a time, each
    batch cut into one contiguous chunk per worker (``workers``, default: the CPUs this process may use; a task per
    image would cost more than a small image's decode). Workers are forked processes for splits of
    ``PROCESS_MIN_ROWS`` or more where the OS forks (Linux), threads otherwise; inside ``shared_workers`` they are
    its pool. ``fn`` must be a module-level function, and is best returning arrays rather than an object per image
    (its result is pickled back). Yields each chunk's first row and ``fn``'s result for it, in order;
    ``BATCHES_IN_FLIGHT`` batches are read ahead while the workers run."""
    column, rows = undecoded_column(split)
    workers = workers or len(os.sched_getaffinity(0))
    shared = SHARED_POOL.get()
    with contextlib.nullcontext(shared) if shared is not None else undecoded_workers(workers, len(rows)) as pool:
        pending: deque[list[tuple[int, Future]]] = deque()
        for start in range(0, len(rows), READ_BATCH):
            stop = min(start + READ_BATCH, len(rows))
            step = -(-(stop - start) // workers)
            chunks = [(first, column.take(rows[first : min(first + step, stop)])) for first in range(start, stop, step)]
            pending.append([(first, pool.submit(on_undecoded, fn, chunk)) for first, chunk in chunks])
            if len(pending) > BATCHES_IN_FLIGHT:
                yield from ((first, part.result()) for first, part in pending.popleft())
        while pending:
            yield from ((first, part.result()) for first, part in pending.popleft())


def undecoded_column(split: Dataset) -> tuple[pa.ChunkedArray, np.ndarray]:
    """The Arrow column of ``split``'s undecoded images (``struct<bytes, path>``, as stored: memory-mapped where the
    split is) and, for each row of the split, its row in that column (``select``/``shuffle`` leave a mapping).
    ``take`` hands rows to the workers without a Python object per row in the parent (Hugging Face's row slicing
    makes a dict per row: about 50 times the cost), and a taken array pickles as its own rows only (a slice pickles
    its parent's buffers)."""
    raw = split.cast_column("image", ImageFeature(decode=False))
    mapping = raw._indices  # datasets' row mapping (no public accessor); None when the rows are the table's own
    rows = mapping.column(0).to_numpy() if mapping is not None else np.arange(len(raw))
    return raw.data.table.column("image"), rows


def on_undecoded(fn: Callable[[list[dict]], T], images: pa.ChunkedArray) -> T:
    """``fn`` over taken rows of ``undecoded_column``, as ``{"bytes", "path"}`` dicts (made where ``fn`` runs)."""
    return fn(images.to_pylist())


@contextlib.contextmanager
def undecoded_workers(workers: int, rows: int) -> Iterator[Executor]:
    """``map_undecoded``'s pool for ``rows`` images: forked processes (each single-threaded in torch) or threads
    (also inside a daemonic process, such as a DataLoader worker, which may not have children). Processes start at
    the first task; on leaving, the pool is not waited for (every result has been collected, or is abandoned)."""
    forks = sys.platform.startswith("linux") and not multiprocessing.current_process().daemon
    if workers > 1 and rows >= PROCESS_MIN_ROWS and forks:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=one_thread)
    else:
        pool = ThreadPoolExecutor(workers)
    try:
        yield pool
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def shared_workers(rows: int, workers: int | None = None) -> Iterator[None]:
    """Every ``map_undecoded`` inside uses one pool, sized for ``rows`` images in all: a data setup scans and signs
    several splits, and starting and stopping forked workers costs about 75 ms each time. No worker starts when
    nothing is mapped (every result remembered); inside another ``shared_workers``, that one's pool."""
    if SHARED_POOL.get() is not None:  # inside another: its pool
        yield
        return
    with undecoded_workers(workers or len(os.sched_getaffinity(0)), rows) as pool:
        token = SHARED_POOL.set(pool)
        try:
            yield
        finally:
            SHARED_POOL.reset(token)


def one_thread() -> None:
    """A forked worker runs one torch thread: the workers are the parallelism (as in torch's DataLoader workers)."""
    torch.set_num_threads(1)


def all_jpeg(split: Dataset) -> bool:
    """Whether every image of ``split`` is a JPEG (by its first bytes)."""
    raw = split.cast_column("image", ImageFeature(decode=False))
    for image in raw["image"]:
        if image.get("bytes") is not None:
            head = image["bytes"][:3]
        else:
            with open(image["path"], "rb") as f:
                head = f.read(3)
        if head != JPEG_MAGIC:
            return False
    return True


def collate_image_list(
    batch: list[tuple[torch.Tensor, int, int]],
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Images of different sizes (decoded or encoded) as a list; labels and indices as tensors."""
    images, labels, index = zip(*batch, strict=True)
    return list(images), torch.tensor(labels), torch.tensor(index)


def label_array(split: Dataset) -> np.ndarray:
    """A split's labels as int64, read as one Arrow column (``split["label"]`` iterates row by row: seconds per
    100,000 images)."""
    column = split.select_columns(["label"]).with_format("arrow")[:]["label"]
    return np.asarray(column.to_numpy(), dtype=np.int64)


def split_fingerprint(split: Dataset) -> str:
    """A hash of a split's content in order: labels and image bytes (or path, size and mtime for file-backed images).

    Any change to which images are in the split, their order, their labels or their files changes it, so it
    covers the dataset, the split made from it and any k-shot selection at once.
    """
    raw = split.cast_column("image", ImageFeature(decode=False))
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(split.features["label"].names).encode())
    for batch in raw.iter(batch_size=256):
        for image, label in zip(batch["image"], batch["label"], strict=True):
            h.update(f"{label}|".encode())
            if image.get("bytes") is not None:
                h.update(hashlib.blake2b(image["bytes"], digest_size=16).digest())
            else:
                path = image["path"]
                st = os.stat(path)
                h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()
