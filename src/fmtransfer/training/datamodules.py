"""The data side of training as LightningDataModules: decoded images (live regimes) and cached feature maps
(frozen and partial regimes, extracted in ``setup`` on a cache miss)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import pytorch_lightning as pl
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from fmtransfer.backbone import build_eval_transform, build_train_transform
from fmtransfer.backbone.tensor_transforms import NotOnTensors, TensorAugment, TensorEval, to_uint8_tensor
from fmtransfer.cache import CachedSplit, CacheResult
from fmtransfer.data import ImageClassificationDataset
from fmtransfer.data.decoded import DecodedImages, Origin, decode, decoded_bytes
from fmtransfer.data.images import collate_image_list
from fmtransfer.heads import InMemoryDataset
from fmtransfer.training.placement import Placement, feature_batches

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def evaluate_each_sample_once(loader, trainer: pl.Trainer | None):
    """``loader`` split across the trainer's processes without padding: under DDP, Lightning's default sampler repeats
    samples to even out the ranks, which would count them twice in validation and test metrics."""
    if trainer is None or trainer.world_size == 1:
        return loader
    sampler = UnrepeatedDistributedSampler(
        loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        persistent_workers=loader.persistent_workers,
    )


class _EvaluateOnce(pl.LightningDataModule):
    """Validation and test loaders that count every sample once, also under DDP."""

    def loader(self, split: str):
        raise NotImplementedError

    def val_dataloader(self):
        return evaluate_each_sample_once(self.loader("validation"), self.trainer)

    def test_dataloader(self):
        return evaluate_each_sample_once(self.loader("test"), self.trainer)


class ImageDataModule(_EvaluateOnce):
    """Decoded images of every split: timm's training augmentation with ``augment``'s settings on train (None: the
    eval transform there too), the eval transform elsewhere. A last, smaller training batch is dropped unless
    ``drop_last_train`` is false (BatchNorm in train mode cannot take a batch of one image).

    ``decode_once_bytes`` > 0: when the decoded splits fit in that many bytes, each split is decoded once (reused by
    the process's later runs; a split with an entry in ``origins``, a fold, as rows of the ``bases`` splits) and
    transformed on the training device, batch by batch (``on_after_batch_transfer``: timm's own augmentation draws,
    the resize on tensors; evaluation images resized and cropped once, bit-identical to timm's transform); on a GPU
    the tensors stay on it. Otherwise images are decoded and transformed every epoch.
    """

    def __init__(
        self,
        splits: Mapping[str, Dataset],
        data_config: dict,
        batch_size: int,
        augment: Mapping | None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last_train: bool = True,
        decode_once_bytes: int = 0,
        origins: Mapping[str, Origin] | None = None,
        bases: Mapping[str, Dataset] | None = None,
    ):
        super().__init__()
        self.splits = splits
        self.drop_last_train = drop_last_train
        self.data_config = data_config
        self.batch_size = batch_size
        self.augment = augment
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.decode_once_bytes = int(decode_once_bytes)
        self.origins, self.bases = dict(origins or {}), bases  # folds: decoded as rows of their base splits
        self.decoded: dict[str, DecodedImages] | None = None
        self.tensor_augment: TensorAugment | None = None
        self.tensor_eval: TensorEval | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.decode_once_bytes > 0 and self.decoded is None:
            self.decoded = self._decode_once()

    def _decode_once(self) -> dict[str, DecodedImages] | None:
        """Every split decoded once, or None (the decoded splits would not fit, or the augmentation has an op that
        does not run on tensors): said in the log either way."""
        evaluate = TensorEval(build_eval_transform(self.data_config))
        try:
            augment = TensorAugment(build_train_transform(self.data_config, self.augment)) if self.augment else None
        except NotOnTensors as exc:
            log.info(f"images decoded every epoch: {exc}")
            return None
        size = tuple(self.data_config["input_size"][1:])
        need = sum(
            decoded_bytes(split, None if name == "train" and augment is not None else size)
            for name, split in self.splits.items()
        )
        if need > self.decode_once_bytes:
            log.info(
                f"images decoded every epoch: decoded once they would take {need / 2**20:.0f} MiB, over "
                f"{self.decode_once_bytes / 2**20:.0f} MiB (trainer.resident_data_mb)"
            )
            return None
        self.tensor_augment, self.tensor_eval = augment, evaluate
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        return {
            name: decode(
                split,
                to_uint8_tensor if name == "train" and augment else evaluate.prepare,
                self.decode_once_bytes,
                device if device is not None and device.type == "cuda" else None,  # host memory on the CPU
                self.origins.get(name),
                self.bases,
            )
            for name, split in self.splits.items()
        }

    def loader(self, split: str) -> DataLoader:
        train = split == "train"
        augmented = train and self.augment is not None
        if self.decoded is not None:
            return DataLoader(
                self.decoded[split],
                batch_size=self.batch_size,
                shuffle=train,
                drop_last=train and self.drop_last_train and len(self.decoded[split]) > self.batch_size,
                collate_fn=collate_image_list if augmented else None,
            )
        eval_tf = build_eval_transform(self.data_config)
        transform = build_train_transform(self.data_config, self.augment) if augmented else eval_tf
        return DataLoader(
            ImageClassificationDataset(self.splits[split], transform),
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and self.drop_last_train and len(self.splits[split]) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Decoded images, on the training device: augmented (a list of any sizes) or normalised (a batch)."""
        if self.decoded is None:
            return batch
        images, *rest = batch
        if isinstance(images, list):
            return (self.tensor_augment(images), *rest)
        return (self.tensor_eval(images), *rest)


class CachedFeatureDataModule(_EvaluateOnce):
    """Cached maps of every split as in-memory tensors, batched by ``feature_batches``.

    ``load_caches`` returns each split's cache entry, extracting the maps first on a miss: it runs in ``setup``
    (once, however often Lightning calls it), on every process, since DDP extraction shards the work by rank.
    ``make_dataset`` turns one cached split into the dataset (pooled vectors for heads, full maps for partial);
    ``make_train``, if given, makes the training set instead (partial's augmented views). ``setup`` makes the
    training set, and the validation set when ``validates`` (a refit on the whole pool validates nothing, and its
    validation entry holds the same rows as its train). A split not made there is made when its loader is first asked
    for: a cross-validation fold never makes a test set; the test split, read once after training, comes from
    ``make_test_stream`` on a single device when given (read from the cache chunk by chunk, never held whole), else
    from ``make_dataset``.
    """

    def __init__(
        self,
        load_caches: Callable[[], dict[str, CacheResult]],
        make_dataset: Callable[[CachedSplit], InMemoryDataset],
        batch_size: int,
        placement: Placement,
        seed: int,
        drop_last_train: bool = False,
        make_train: Callable[[], InMemoryDataset] | None = None,
        make_test_stream: Callable[[CachedSplit], Iterable] | None = None,
        validates: bool = True,
    ):
        super().__init__()
        self.load_caches = load_caches
        self.make_dataset = make_dataset
        self.make_train = make_train
        self.make_test_stream = make_test_stream
        self.validates = validates
        self.batch_size = batch_size
        self.placement = placement
        self.seed = seed
        self.drop_last_train = drop_last_train
        self.caches: dict[str, CacheResult] = {}
        self.sets: dict[str, InMemoryDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.caches:
            return
        self.caches = self.load_caches()
        # ``load_caches`` may leave out splits this fit never reads (a refit on views: the un-augmented train).
        if self.make_train is not None:
            self.sets["train"] = self.make_train()
        wanted = ("train", "validation") if self.validates else ("train",)
        self.sets.update(
            {s: self.make_dataset(self.caches[s].split) for s in wanted if s in self.caches and s not in self.sets}
        )

    def loader(self, split: str, shuffle: bool = False, drop_last: bool = False):
        self.setup()
        if split not in self.sets:
            cached = self.caches[split].split
            if split == "test" and self.make_test_stream is not None and self.placement.device is not None:
                return self.make_test_stream(cached)
            self.sets[split] = self.make_dataset(cached)
        return feature_batches(self.sets[split], self.batch_size, shuffle, self.placement, self.seed, drop_last)

    def train_dataloader(self):
        # Like the image loaders: no last training batch of one sample (BatchNorm in train mode cannot take it).
        drop_last = self.drop_last_train and len(self.sets["train"]) > self.batch_size
        return self.loader("train", shuffle=True, drop_last=drop_last)
