"""Running a comparison's runs: one at a time in this process, or side by side in worker processes on one device.

Independent runs (folds, candidates, seeds) are submitted as soon as they are known; a run whose ``metrics.json``
exists is reused, and no run starts once ``compare.time_budget_s`` would be exceeded by the longest run so far.
Every run seeds itself from its config, so a run's numbers do not depend on where or beside what it ran.

Comparisons in separate processes share one device through ``RunSlots`` (``FMTRANSFER_RUN_SLOTS``): a run trains
only while it holds one of the device's slots, so the GPU report kit's comparisons of one stage take runs from one
pool of slots, each as many as the others leave free.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fmtransfer.errors import ConfigError
from fmtransfer.regimes import run_regime

log = logging.getLogger(__name__)

RUN_SLOTS_ENV = "FMTRANSFER_RUN_SLOTS"  # "<folder>:<count>", set by whoever runs comparisons side by side
WORKER_MEMORY_GB = 10.0  # GPU memory one run of the full preset may need (an H200's comparison peaked below 8)
MAX_WORKERS = 8


def worker_count(setting, accelerator: str) -> int:
    """``compare.workers``: a count, or ``auto`` (one on a CPU, where one run already uses every core; on a GPU as
    many as its free memory holds at ``WORKER_MEMORY_GB`` each, at most one per two CPU cores and ``MAX_WORKERS``)."""
    if setting not in (None, "auto"):
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
            raise ConfigError(f"compare.workers={setting} must be a positive integer or 'auto'.")
        return setting
    if accelerator not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
        return 1
    free, _ = torch.cuda.mem_get_info()
    cores = len(os.sched_getaffinity(0))
    return max(1, min(MAX_WORKERS, cores // 2, int(free / 2**30 // WORKER_MEMORY_GB)))


class RunSlots:
    """At most ``count`` runs at once across every process given the same ``folder``: a run holds an exclusive
    ``flock`` on one of ``count`` slot files while it runs. The OS drops a process's locks when it ends, so a run that
    crashes never keeps its slot."""

    def __init__(self, folder: Path, count: int, poll_s: float = 0.2):
        if count < 1:
            raise ConfigError(f"{RUN_SLOTS_ENV}: {count} slots; give at least 1 (<folder>:<count>).")
        self.folder, self.count, self.poll_s = Path(folder), int(count), poll_s
        self.folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls) -> RunSlots | None:
        """The slots ``FMTRANSFER_RUN_SLOTS`` names (``<folder>:<count>``), or None when it is not set."""
        value = os.environ.get(RUN_SLOTS_ENV)
        if not value:
            return None
        folder, _, count = value.rpartition(":")
        if not folder or not count.isdigit():
            raise ConfigError(f"{RUN_SLOTS_ENV}={value!r}: expected <folder>:<count>, e.g. /tmp/slots:4.")
        return cls(Path(folder), int(count))

    @contextmanager
    def held(self) -> Iterator[int]:
        """Wait for a free slot, hold it for the ``with`` block; yields its index."""
        import fcntl  # POSIX only: slots are set by the GPU kit, on Linux

        while True:
            for index in range(self.count):
                handle = open(self.folder / f"slot{index}", "a")  # noqa: SIM115 - closed below, lock and all
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                try:
                    yield index
                finally:
                    handle.close()  # releases the lock
                return
            time.sleep(self.poll_s)


def _worker_init(threads: int, setup: Callable[[], None] | None) -> None:
    torch.set_num_threads(threads)
    if setup is not None:
        setup()


def _run(label: str, cfg: DictConfig, run_dir: Path, deadline: float | None, longest: float) -> dict | None:
    """One run (in this process or a worker): reused if done, skipped if it could not end before ``deadline``."""
    done = run_dir / "metrics.json"
    if done.is_file():
        log.info(f"{label}: done earlier, reusing {done}")
        return json.loads(done.read_text())
    slots = RunSlots.from_env()
    with slots.held() if slots is not None else nullcontext():
        if deadline is not None and time.time() + longest >= deadline:  # judged when the run could start
            log.warning(f"{label}: not run (compare.time_budget_s would be exceeded)")
            return None
        log.info(f"{label}: running")
        start = time.perf_counter()
        metrics = run_regime(cfg, run_dir)
        metrics["_seconds"] = time.perf_counter() - start
    # A run's Trainer, datamodule and model hold each other in reference cycles, with its features or images: freed
    # now, so the next run (or the report) reuses that memory instead of adding to it. What outlives the collection
    # (imported modules: over 600,000 objects, a 0.3 s scan; the process's memos) is frozen, so the next run's
    # collection scans only what that run made.
    gc.collect()
    gc.freeze()
    scored = f"test acc {metrics['test']['acc']:.4f}" if metrics["test"] else f"fold acc {metrics['val']['acc']:.4f}"
    log.info(f"{label}: {scored} in {metrics['_seconds']:.0f} s")
    return metrics


class RunScheduler:
    """Runs (or reuses) run dirs within ``budget`` seconds, ``workers`` at a time (above 1: in worker processes,
    each set up by ``worker_setup``, e.g. logging). ``submit`` returns a future of the run's metrics (None: not run,
    the budget would be exceeded); with one worker the run is done before ``submit`` returns."""

    def __init__(self, budget: float | None, workers: int = 1, worker_setup: Callable[[], None] | None = None):
        self.deadline = None if budget is None else time.time() + float(budget)
        self.workers = workers
        self.longest = 0.0
        self.pool = None
        if workers > 1:
            threads = max(1, len(os.sched_getaffinity(0)) // workers)
            context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
            self.pool = ProcessPoolExecutor(
                workers, mp_context=context, initializer=_worker_init, initargs=(threads, worker_setup)
            )

    def submit(self, label: str, cfg: DictConfig, run_dir: Path) -> Future:
        if self.pool is None:
            future: Future = Future()
            future.set_result(self._finished(_run(label, cfg, run_dir, self.deadline, self.longest)))
            return future
        # Side by side, each run's progress bar would garble the others' output.
        cfg = OmegaConf.merge(cfg, {"trainer": {"progress_bar": False}})
        inner = self.pool.submit(_run, label, cfg, run_dir, self.deadline, self.longest)
        outer: Future = Future()
        inner.add_done_callback(lambda f: _relay(f, outer, self._finished))
        return outer

    def _finished(self, metrics: dict | None) -> dict | None:
        if metrics is not None and "_seconds" in metrics:
            self.longest = max(self.longest, metrics.pop("_seconds"))
        return metrics

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> RunScheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _relay(inner: Future, outer: Future, finished) -> None:
    error = inner.exception()
    if error is not None:
        outer.set_exception(error)
    else:
        outer.set_result(finished(inner.result()))
