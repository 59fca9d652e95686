"""Extraction under DDP: every rank writes the samples it was given into a shard of its own; rank 0 merges them.

Layout while an entry is built by ``W`` processes (one shard directory per global rank)::

    <root>/<backbone>/.partial-<split>-<key>-shards/
        rank<r>/<level>.npy, labels.npy, indices.npy   the rank's rows and the sample index of each row
        rank<r>/shard.json                             written last: the shard is complete

The merge writes every shard's rows at their sample indices into an ordinary ``CacheEntryWriter`` and publishes it
(which checks that every sample was written), so a cache built by many processes is the same entry, byte for byte,
as one built by a single process. The shard directory must be on a filesystem every node sees (``cache.dir``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pytorch_lightning.callbacks import BasePredictionWriter

from fmtransfer.cache.store import LABELS, CacheEntryWriter, safe_name, write_json_durably
from fmtransfer.errors import CacheError

SHARD_DONE = "shard.json"
INDICES = "indices"
MERGE_ROWS = 4096  # rows copied per step while merging: bounded memory whatever the cache size


def shard_root(entry_dir: Path) -> Path:
    """Where the ranks' shards of the entry ``entry_dir`` are built (a ``.partial-*`` name: cleaned like any)."""
    return entry_dir.parent / f".partial-{entry_dir.name}-shards"


class ShardWriter(BasePredictionWriter):
    """A prediction writer for DDP: this rank's batches go, in arrival order, into ``<root>/rank<r>/``.

    The shard is allocated when prediction starts, after a barrier so that rank 0 has cleaned up leftovers of
    interrupted builds before any rank creates files. It has room for ``ceil(num_samples / world_size)`` rows, what
    a distributed sampler gives a rank (padded or not); only the rows written are merged.
    """

    def __init__(self, root: Path, num_samples: int, shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype):
        super().__init__(write_interval="batch")
        self.root = root
        self.num_samples = num_samples
        self.shapes = dict(shapes)
        self.dtype = dtype
        self.rows = 0

    def on_predict_start(self, trainer, pl_module) -> None:
        trainer.strategy.barrier("fmtransfer-shards-start")
        self.dir = self.root / f"rank{trainer.global_rank}"
        num = -(-self.num_samples // trainer.world_size)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.arrays = {
                name: np.lib.format.open_memmap(
                    self.dir / f"{safe_name(name)}.npy", mode="w+", dtype=self.dtype, shape=(num, *shape)
                )
                for name, shape in self.shapes.items()
            }
        except OSError as exc:
            raise CacheError(f"cannot create the shard {self.dir} of rank {trainer.global_rank}: {exc}") from exc
        self.indices = np.full(num, -1, dtype=np.int64)
        self.labels = np.full(num, -1, dtype=np.int64)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        n = len(prediction["indices"])
        if self.rows + n > len(self.indices):
            raise CacheError(
                f"rank {trainer.global_rank} was given more than {len(self.indices)} of the {self.num_samples} "
                f"samples; the prediction sampler does not split the data across ranks."
            )
        rows = slice(self.rows, self.rows + n)
        for name, value in prediction["maps"].items():
            self.arrays[name][rows] = value.cpu().numpy()
        self.indices[rows] = prediction["indices"].cpu().numpy()
        self.labels[rows] = prediction["labels"].cpu().numpy()
        self.rows += n

    def on_predict_end(self, trainer, pl_module) -> None:
        for arr in self.arrays.values():
            arr.flush()
        self.arrays.clear()
        np.save(self.dir / f"{INDICES}.npy", self.indices[: self.rows])
        np.save(self.dir / f"{LABELS}.npy", self.labels[: self.rows])
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "rows": self.rows}
        write_json_durably(self.dir / SHARD_DONE, record)  # last: the shard is complete
        trainer.strategy.barrier("fmtransfer-shards-end")


def merge_shards(root: Path, world_size: int, writer: CacheEntryWriter) -> dict:
    """Copy every rank's shard into ``writer`` at the samples' indices; returns what the manifest records of it.

    Raises ``CacheError`` when a shard is missing or incomplete. Samples given to more than one rank (samplers that
    pad) are written once per copy, with the same values, and counted in ``duplicate_rows``; ``publish`` then checks
    that no sample is missing.
    """
    seen = np.zeros(len(writer.written), dtype=np.int64)
    shards = []
    for rank in range(world_size):
        folder = root / f"rank{rank}"
        try:
            record = json.loads((folder / SHARD_DONE).read_text())
        except (OSError, ValueError) as exc:
            raise CacheError(
                f"the shard of rank {rank} ({folder}) is missing or incomplete. With several nodes, cache.dir must "
                f"be on a filesystem every node shares."
            ) from exc
        indices = np.load(folder / f"{INDICES}.npy")
        labels = np.load(folder / f"{LABELS}.npy")
        arrays = {name: np.load(folder / f"{safe_name(name)}.npy", mmap_mode="r") for name in writer.levels}
        for start in range(0, len(indices), MERGE_ROWS):
            rows = slice(start, min(start + MERGE_ROWS, len(indices)))  # level arrays may have an unused last row
            writer.write(indices[rows], labels[rows], {k: np.asarray(v[rows]) for k, v in arrays.items()})
        np.add.at(seen, indices, 1)
        shards.append({"rank": rank, "rows": int(record["rows"])})
    return {"world_size": world_size, "shards": shards, "duplicate_rows": int(np.maximum(seen - 1, 0).sum())}


def remove_shards(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
