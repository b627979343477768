"""The streaming pipeline: shards -> per-worker patches -> uint8 batches, the same length on every rank.

Every (rank, DataLoader worker) pair is one *stream*. A stream reads its own shards (or, when there
are fewer shards than streams, every shard but only the samples whose key hashes to it), decodes
each image ONCE, cuts `patches_per_image` pairs from it, mixes them in a shuffle buffer and batches
them. Streams never run dry: they cycle over their shards, reshuffled on every pass, so each rank
yields exactly `steps` batches per epoch however the shards are sized or counted. DDP would hang
otherwise. All randomness comes from numpy generators seeded with (seed, rank, worker, epoch).

Why not webdataset's own `shardshuffle`, `shuffle` and `with_epoch`: they seed from the pid and the
clock (not reproducible), reuse one shard order every epoch, and count per worker. webdataset still
does what it is best at: URL expansion (brace patterns, `pipe:`, http) and tar reading.
"""

from __future__ import annotations

import itertools
import sys
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from restorer.data.decode import ImageDecodeError, decode_image
from restorer.data.degrade import PatchSpec, center_pair, jpeg_decode, random_patch
from restorer.data.manifest import load_manifest, shard_paths

IMAGE_MEMBERS = ("jpg", "png", "webp", "bmp", "tif", "jpeg", "tiff")


@dataclass
class DataConfig:
    shards: str = ""  # a shard folder or its manifest.json
    train_urls: str = ""  # instead of the manifest's list: any URL pattern webdataset reads
    val_urls: str = ""  # (brace patterns, pipe:aws s3 cp s3://... -, http://...)
    epoch_samples: int = 0  # patches per epoch; 0: the manifest's train sample count (the seed's epoch)
    patch: PatchSpec = field(default_factory=PatchSpec)
    patches_per_image: int = 128  # patches cut from each decoded image; decoding costs 100x a patch
    shuffle_buffer: int = 1024  # patches held per stream, ~50 KB each at patch 128
    workers: int = 4  # DataLoader worker processes per rank
    val_crop: int = 256  # validation: centre crop of at most this side ...
    val_quality: int = 10  # ... JPEG-encoded at this quality

    def validate(self) -> None:
        """Raise ValueError naming the field that is wrong."""
        if not (self.shards or self.train_urls):
            raise ValueError("shards: set a shard folder (or manifest.json), or train_urls")
        if self.train_urls and not self.shards and self.epoch_samples <= 0:
            raise ValueError("epoch_samples must be > 0 when train_urls is used without a manifest")
        for name in ("patches_per_image", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0; got {self.workers}")
        if self.val_crop < 8:
            raise ValueError(f"val_crop must be >= 8; got {self.val_crop}")
        if not 1 <= self.val_quality <= 100:
            raise ValueError(f"val_quality must be in [1, 100]; got {self.val_quality}")
        self.patch.validate()


def split_urls(cfg: DataConfig, split: str) -> list[str]:
    """The shard URLs of a split: the explicit pattern if given, else the manifest's list."""
    pattern = cfg.train_urls if split == "train" else cfg.val_urls
    if pattern:
        return list(expand_urls(pattern))
    if not cfg.shards:
        return []
    return shard_paths(cfg.shards, split)


def epoch_samples(cfg: DataConfig) -> int:
    """Patches per epoch (all ranks together)."""
    return cfg.epoch_samples or load_manifest(cfg.shards)["splits"]["train"]["samples"]


def steps_per_epoch(cfg: DataConfig, batch_size: int, world_size: int) -> int:
    """Optimizer steps per epoch, identical on every rank: the last partial global batch is dropped."""
    return max(1, epoch_samples(cfg) // (batch_size * world_size))


def _stream_id(rank: int, world_size: int) -> tuple[int, int, int, int]:
    """(worker id, workers per rank, stream id, stream count) of the calling process."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return worker, workers, rank * workers + worker, world_size * workers


def _owner(key: str, streams: int) -> int:
    """The stream a sample belongs to when streams share shards: stable, disjoint, complete."""
    return zlib.crc32(key.encode()) % streams


class SkipLog:
    """Counts samples that could not be used and says so on stderr: the first few, then at 10, 100, ..."""

    def __init__(self, where: str):
        self.where, self.count = where, 0

    def __call__(self, what: str, reason: str) -> None:
        self.count += 1
        if self.count <= 3 or self.count in (10, 100, 1000) or self.count % 10000 == 0:
            print(f"restorer: warning: skipped {what}: {reason} ({self.count} skipped so far by {self.where})",
                  file=sys.stderr, flush=True)

    def handler(self, exn: Exception) -> bool:
        """webdataset error handler: a broken tar or member is logged and the stream goes on."""
        self(" ".join(str(a) for a in exn.args[1:]) or "a shard", f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True


def read_images(urls: list[str], skip: SkipLog, keep=None) -> Iterator[tuple[str, np.ndarray]]:
    """(key, decoded image) for every usable sample of the shards, in order; `keep(key)` filters."""
    for sample in tarfile_samples(({"url": u} for u in urls), handler=skip.handler):
        key = sample.get("__key__", "?")
        if keep is not None and not keep(key):
            continue
        member = next((m for m in IMAGE_MEMBERS if m in sample), None)
        if member is None:  # e.g. a tar cut short after the json member
            skip(f"{key} in {sample.get('__url__')}", "no image member")
            continue
        try:
            yield key, decode_image(sample[member])
        except ImageDecodeError as e:
            skip(f"{key} in {sample.get('__url__')}", str(e))


def _batch(pairs: list[tuple[bytes, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N x C x P x P tensors in channels-last memory (a permuted NHWC buffer): what the GPU's
    channels_last convolutions read, and no transpose on the CPU."""
    inputs = torch.from_numpy(np.stack([jpeg_decode(b) for b, _ in pairs])).permute(0, 3, 1, 2)
    targets = torch.from_numpy(np.stack([t for _, t in pairs])).permute(0, 3, 1, 2)
    return inputs, targets


class TrainPatches(IterableDataset):
    """An endless stream of training batches for one rank; the DataLoader takes as many as it needs."""

    def __init__(self, urls: list[str], cfg: DataConfig, *, batch_size: int, seed: int, rank: int,
                 world_size: int, epoch: int = 0):
        if not urls:
            raise ValueError("no training shards")
        self.urls, self.cfg, self.batch_size = list(urls), cfg, batch_size
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, workers, stream, streams = _stream_id(self.rank, self.world_size)
        rng = np.random.default_rng([self.seed, self.rank, worker, self.epoch])
        skip = SkipLog(f"rank {self.rank} worker {worker}")
        if len(self.urls) >= streams:
            mine, keep = self.urls[stream::streams], None
        else:  # fewer shards than streams: all read everything, each keeps its own samples
            mine, keep = self.urls, (lambda key: _owner(key, streams) == stream)
        cfg, k = self.cfg, self.cfg.patches_per_image

        def images() -> Iterator[np.ndarray]:
            nonlocal keep
            while True:  # one pass over this stream's shards in a fresh order each time
                order = [mine[i] for i in rng.permutation(len(mine))]
                n = 0
                for _, image in read_images(order, skip, keep):
                    n += 1
                    yield image
                if n == 0 and keep is not None:  # a tiny set: no sample hashed to this stream
                    keep = None
                elif n == 0:
                    raise RuntimeError(f"no usable samples in {len(mine)} shards ({skip.count} skipped): {mine[:3]}")

        buffer: list[tuple[bytes, np.ndarray]] = []
        batch: list[tuple[bytes, np.ndarray]] = []
        for image in images():
            for _ in range(k):
                pair = random_patch(image, cfg.patch, rng)
                if len(buffer) < cfg.shuffle_buffer:
                    buffer.append(pair)
                    continue
                i = int(rng.integers(len(buffer)))
                buffer[i], pair = pair, buffer[i]
                batch.append(pair)
                if len(batch) == self.batch_size:
                    yield _batch(batch)
                    batch = []


class ValPairs(IterableDataset):
    """Every validation image exactly once across all ranks and workers: (input, target, key) with
    batch 1 (crops may differ in size). Deterministic: fixed centre crops, fixed quality."""

    def __init__(self, urls: list[str], cfg: DataConfig, *, rank: int, world_size: int):
        self.urls, self.cfg, self.rank, self.world_size = list(urls), cfg, rank, world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, str]]:
        worker, _, stream, streams = _stream_id(self.rank, self.world_size)
        skip = SkipLog(f"rank {self.rank} val worker {worker}")
        for key, image in read_images(self.urls, skip, keep=lambda key: _owner(key, streams) == stream):
            inputs, targets = _batch([center_pair(image, self.cfg.val_crop, self.cfg.val_quality, self.cfg.patch.grayscale)])
            yield inputs, targets, key


class EpochLoader:
    """Exactly `steps` batches of one epoch: `len()` is the step count, iteration ends there."""

    def __init__(self, loader: DataLoader, steps: int):
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.steps)


def train_loader(cfg: DataConfig, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, steps: Optional[int] = None, pin_memory: bool = False) -> EpochLoader:
    """One epoch of training batches for this rank: (input, target) uint8 N x C x P x P.

    `steps` defaults to `steps_per_epoch`; it is the same on every rank whatever the shards.
    Workers start anew each epoch, seeded with the epoch, so no epoch repeats another's patches.
    """
    dataset = TrainPatches(split_urls(cfg, "train"), cfg, batch_size=batch_size, seed=seed, rank=rank,
                           world_size=world_size, epoch=epoch)
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.workers, pin_memory=pin_memory,
                        prefetch_factor=4 if cfg.workers else None)
    return EpochLoader(loader, steps if steps is not None else steps_per_epoch(cfg, batch_size, world_size))


def val_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """This rank's share of the validation images: (input, target, key), batch 1, deterministic."""
    dataset = ValPairs(split_urls(cfg, "val"), cfg, rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_size=None, num_workers=min(cfg.workers, 2), pin_memory=pin_memory)
