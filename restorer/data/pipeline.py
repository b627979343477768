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
import signal
import sys
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from restorer.data.decode import IMAGE_EXTENSIONS, ImageDecodeError, decode_image
from restorer.data.degrade import PatchSpec, center_pair, jpeg_decode, random_patch
from restorer.data.manifest import load_manifest, shard_paths

IMAGE_MEMBERS = tuple(sorted(ext[1:] for ext in IMAGE_EXTENSIONS))  # webdataset member names: no dot


@dataclass
class DataConfig:
    shards: str = ""  # a shard folder or its manifest.json
    train_urls: str = ""  # instead of the manifest's list: any URL pattern webdataset reads
    val_urls: str = ""  # (brace patterns, pipe:aws s3 cp s3://... -, http://...)
    epoch_samples: int = 0  # patches per epoch; 0: every training image once, patches_per_image each
    patch: PatchSpec = field(default_factory=PatchSpec)
    patches_per_image: int = 256  # patches cut from each decoded image: a decode costs ~100 patches
    shuffle_buffer: int = 2048  # patches held per stream, ~50 KB each at patch 128
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
        try:
            self.patch.validate()
        except ValueError as e:
            raise ValueError(f"patch.{e}") from None


def split_urls(cfg: DataConfig, split: str) -> list[str]:
    """The shard URLs of a split: the explicit pattern if given, else the manifest's list."""
    pattern = cfg.train_urls if split == "train" else cfg.val_urls
    if pattern:
        return list(expand_urls(pattern))
    if not cfg.shards:
        return []
    return shard_paths(cfg.shards, split)


def epoch_samples(cfg: DataConfig) -> int:
    """Patches per epoch (all ranks together): by default every training image is visited once and
    gives `patches_per_image` patches. With patches_per_image 1 that is the seed's epoch."""
    if cfg.epoch_samples:
        return cfg.epoch_samples
    return load_manifest(cfg.shards)["splits"]["train"]["samples"] * cfg.patches_per_image


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
    """Counts samples that could not be used and says so on stderr: the first of each kind of
    reason, the first few, then at 10, 100, 1000 and every 10,000."""

    def __init__(self, where: str):
        self.where, self.count, self.kinds = where, 0, set()

    def __call__(self, what: str, reason: str) -> None:
        self.count += 1
        kind = reason.split(":")[0]
        new_kind = kind not in self.kinds
        self.kinds.add(kind)
        if new_kind or self.count <= 3 or self.count in (10, 100, 1000) or self.count % 10000 == 0:
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


def _batch(pairs: list[tuple[bytes, np.ndarray]], out: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) as uint8 N x H x W x C arrays, written into `out` (2 x N x H x W x C) if given."""
    if out is None:
        out = np.empty((2, len(pairs), *pairs[0][1].shape), np.uint8)
    for i, (jpeg, target) in enumerate(pairs):
        out[0, i] = jpeg_decode(jpeg)
        out[1, i] = target
    return out[0], out[1]


def to_tensors(inputs: np.ndarray, targets: np.ndarray, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N x C x P x P tensors in channels-last memory (a permuted NHWC buffer): what the GPU's
    channels_last convolutions read, with no transpose on the CPU. Pinned for non-blocking copies."""
    out = tuple(torch.from_numpy(a).permute(0, 3, 1, 2) for a in (inputs, targets))
    return tuple(t.pin_memory() for t in out) if pin_memory else out


PREFETCH = 4  # batches in flight per worker
RING = PREFETCH + 3  # batch slots per worker: those in flight, one being copied out, spares


class TrainPatches(IterableDataset):
    """An endless stream of training batches for one rank; the DataLoader takes as many as it needs.

    DataLoader workers write each batch into a slot of a shared-memory ring made once per epoch
    and hand over only (worker, slot). Pickling 1.5 MB batches through a pipe, or torch's fresh
    shared-memory segment per tensor, cost 15-25% of the workers' time (bench/loader.py). The
    main process copies a slot out (into pinned memory on CUDA) before the worker can reuse it:
    a worker has at most PREFETCH batches in flight, and the ring has more slots than that.
    Without workers (workers=0) the batches are plain arrays.
    """

    def __init__(self, urls: list[str], cfg: DataConfig, *, batch_size: int, seed: int, rank: int,
                 world_size: int, epoch: int = 0, step: int = 0):
        if not urls:
            raise ValueError("no training shards")
        self.urls, self.cfg, self.batch_size = list(urls), cfg, batch_size
        self.seed, self.rank, self.world_size, self.epoch, self.step = seed, rank, world_size, epoch, step
        self._stream: Optional[Iterator] = None
        p, c = cfg.patch.size, cfg.patch.channels
        self.ring = (torch.empty((cfg.workers, RING, 2, batch_size, p, p, c), dtype=torch.uint8).share_memory_()
                     if cfg.workers else None)

    def batch(self, item) -> tuple[np.ndarray, np.ndarray]:
        """The (inputs, targets) an item of this dataset stands for; a ring slot is copied out."""
        if self.ring is None:
            return item
        worker, slot = item
        pair = self.ring[worker, slot].numpy()
        return pair[0].copy(), pair[1].copy()

    def __iter__(self) -> Iterator:
        """The stream goes on where the last epoch left it (the DataLoader keeps its workers, and
        each worker its copy of this object), so the shards are read through in turn over a run
        rather than from the start of a fresh shuffle every epoch."""
        if self._stream is None:
            self._stream = self._generate()
        return self._stream

    def _generate(self) -> Iterator:
        worker, workers, stream, streams = _stream_id(self.rank, self.world_size)
        rng = np.random.default_rng([self.seed, self.rank, worker, self.epoch, self.step])
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

        ring = self.ring[worker].numpy() if self.ring is not None else None
        buffer: list[tuple[bytes, np.ndarray]] = []
        batch: list[tuple[bytes, np.ndarray]] = []
        made = 0
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
                    if ring is None:
                        yield _batch(batch)
                    else:
                        _batch(batch, out=ring[made % RING])
                        yield worker, made % RING
                    made += 1
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
            yield *_batch([center_pair(image, self.cfg.val_crop, self.cfg.val_quality, self.cfg.patch.grayscale)]), key


def _ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: torchrun and SLURM signal the whole process group; the trainer decides when to
    stop (after saving) and its DataLoader ends the workers. A worker killed by that SIGTERM would
    crash the trainer before it could save."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _as_is(batch):
    """collate_fn: keep numpy arrays as they are (the default converts them to tensors in the worker)."""
    return batch


class EpochLoader:
    """Exactly `steps` batches of one epoch: `len()` is the step count, iteration ends there."""

    def __init__(self, loader: DataLoader, steps: int, pin_memory: bool):
        self.loader, self.steps, self.pin_memory = loader, steps, pin_memory

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for item in itertools.islice(iter(self.loader), self.steps):
            yield to_tensors(*self.loader.dataset.batch(item), self.pin_memory)


def train_loader(cfg: DataConfig, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, step: int = 0, steps: Optional[int] = None, pin_memory: bool = False) -> EpochLoader:
    """Training batches for this rank, epoch after epoch: each `iter()` yields one epoch of
    (input, target) uint8 N x C x P x P, and the next one continues the same streams.

    `steps` (per epoch) defaults to `steps_per_epoch`; it is the same on every rank whatever the
    shards. `epoch` and `step` say where the run starts (a resumed run starts later); with the
    seed, the rank and the worker they seed the streams, so a resumed run does not replay patches.
    """
    dataset = TrainPatches(split_urls(cfg, "train"), cfg, batch_size=batch_size, seed=seed, rank=rank,
                           world_size=world_size, epoch=epoch, step=step)
    loader = DataLoader(dataset, batch_size=None, collate_fn=_as_is, worker_init_fn=_ignore_stop_signals, num_workers=cfg.workers,
                        prefetch_factor=PREFETCH if cfg.workers else None, persistent_workers=cfg.workers > 0)
    return EpochLoader(loader, steps if steps is not None else steps_per_epoch(cfg, batch_size, world_size), pin_memory)


def val_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1,
               pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, str]]:
    """This rank's share of the validation images: (input, target, key), batch 1, deterministic."""
    dataset = ValPairs(split_urls(cfg, "val"), cfg, rank=rank, world_size=world_size)
    for inputs, targets, key in DataLoader(dataset, batch_size=None, collate_fn=_as_is, worker_init_fn=_ignore_stop_signals, num_workers=min(cfg.workers, 2)):
        yield *to_tensors(inputs, targets, pin_memory), key
