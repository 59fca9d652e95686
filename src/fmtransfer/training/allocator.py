"""glibc's allocator for CPU training: keep freed activation memory in the process for the next step.

By default glibc serves every allocation above a dynamic threshold (at most 32 MiB) with a fresh ``mmap`` and hands
freed memory at the heap's top back to the OS past a trim threshold, so a batch's activations are page-faulted in
again whenever the heap was trimmed, at the start of every fit and validation pass after a quieter phase. Fixing both
thresholds (``mallopt``) keeps that memory mapped. Python's memory settings have no such knob; PyTorch's CPU tuning
guide reaches the same end with jemalloc or tcmalloc, which this keeps the user from having to preload. The bytes in
use (``mallinfo2``) are how a run's peak memory is measured on the CPU without giving kept memory back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from fmtransfer.errors import ConfigError

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MiB = 2**20


@dataclass(frozen=True)
class MallocSettings:
    """``trainer.malloc``: allocations below ``mmap_threshold_mb`` come from the heap, and up to
    ``trim_threshold_mb`` of free memory at its top stays mapped."""

    mmap_threshold_mb: int
    trim_threshold_mb: int


def malloc_settings(setting) -> MallocSettings | None:
    """``trainer.malloc`` checked: null, or both thresholds as non-negative sizes in MiB."""
    if setting is None:
        return None
    keys = ("mmap_threshold_mb", "trim_threshold_mb")
    values = {k: setting.get(k) if hasattr(setting, "get") else None for k in keys}
    bad = [k for k, v in values.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad or set(setting) != set(keys):
        raise ConfigError(
            f"trainer.malloc={setting!r}: give both {keys[0]} and {keys[1]} as whole MiB >= 0 "
            "(e.g. {mmap_threshold_mb: 256, trim_threshold_mb: 1024}), or null for glibc's defaults."
        )
    return MallocSettings(**values)


def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h, glibc >= 2.33)
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


@functools.cache  # looked up once per process: every fit's PeakMemory asks
def heap_in_use_reader() -> Callable[[], int] | None:
    """A function returning the bytes this process holds through glibc's ``malloc`` (every arena's chunks in use
    plus its mmapped blocks: ``mallinfo2``), or None where the C library is not glibc >= 2.33. Freed memory that glibc
    keeps for reuse is not counted, so the figure needs no trimming of the heap; a call walks the free lists
    (about 0.3-1 ms on a trained model's fragmented heap)."""
    libc = glibc()
    mallinfo2 = getattr(libc, "mallinfo2", None) if libc is not None else None
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return in_use


_applied: MallocSettings | None = None


def tune_malloc(settings: MallocSettings | None) -> bool:
    """Apply ``settings`` to this process's glibc allocator (None: leave it as it is, which is glibc's defaults
    unless an earlier run of the process tuned it). Returns whether settings are in force; a C library other than
    glibc (macOS, musl) is left alone, with a debug note."""
    global _applied
    if settings is None or settings == _applied:
        return settings is not None
    libc = glibc()
    if libc is None:
        log.debug("trainer.malloc: not glibc; the C library's allocator is left as it is")
        return False
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, int(settings.mmap_threshold_mb * MiB))
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, int(settings.trim_threshold_mb * MiB))
    if not (mmap_ok and trim_ok):
        log.warning(f"trainer.malloc: glibc refused {settings} (mallopt returned {mmap_ok}, {trim_ok})")
        return False
    _applied = settings
    return True
