"""The streaming pipeline: shards -> per-worker patches -> uint8 batches, the same length on every rank.

Every (rank, DataLoader worker) pair is one *stream*. A stream reads its own shards (or, when there
are fewer shards than streams, every shard but only the samples whose key hashes to it), decodes
each image ONCE, cuts `patches_per_image` pairs from it, mixes them in a shuffle buffer and batches
them. Streams never run dry: they cycle over their shards, reshuffled on every pass, so each rank
yields exactly `steps` batches per epoch however the shards are sized or counted. DDP would hang
otherwise. All randomness comes from numpy generators seeded with (seed, rank, worker, epoch).

Why not webdataset's own `shardshuffle`, `shuffle` and `with_epoch`: they seed from the pid and the
clock (not reproducible), reuse one shard order every epoch, and count per worker. webdataset still
does what it is best at: URL expansion (brace patterns), opening files and `pipe:` commands, and tar
reading. http(s) shards are streamed by curl through HttpShard, which bounds a stalled transfer and
never lets a failed one pass as a short shard.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import time
import zlib
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from restorer.data import jpeg
from restorer.data.decode import IMAGE_EXTENSIONS, ImageDecodeError, decode_image
from restorer.config import DataConfig
from restorer.data.patches import center_crop, training_pair
from restorer.errors import RunError
from restorer.data.manifest import load_manifest, shard_paths
from restorer.stop import shutdown_event, worker_signals

IMAGE_MEMBERS = tuple(sorted(ext[1:] for ext in IMAGE_EXTENSIONS))  # webdataset member names: no dot


def split_urls(cfg: DataConfig, split: str) -> list[str]:
    """The shard URLs of a split: the explicit pattern if given, else the manifest's list."""
    pattern = cfg.train_urls if split == "train" else cfg.val_urls
    if pattern:
        return list(expand_urls(pattern))
    if not cfg.shards:
        return []
    return shard_paths(cfg.shards, split)


class NoTrainingData(RunError):
    """Not one training image could be read from any shard; the message is one line.

    Raised in a DataLoader worker, it reaches the trainer rebuilt by the DataLoader from the
    worker's traceback text ("Caught NoTrainingData in DataLoader worker ... Original Traceback
    ... NoTrainingData: <message>"): the message is that text's last line, without its prefix."""

    def __init__(self, message: str) -> None:
        last = str(message).strip().splitlines()[-1] if str(message).strip() else str(message)
        super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1])


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
        self._last: Optional[Exception] = None

    def __call__(self, what: str, reason: str) -> None:
        self.count += 1
        kind = reason.split(":")[0]
        new_kind = kind not in self.kinds
        self.kinds.add(kind)
        if new_kind or self.count <= 3 or self.count in (10, 100, 1000) or self.count % 10000 == 0:
            print(f"restorer: warning: skipped {what}: {reason} ({self.count} skipped so far by {self.where})",
                  file=sys.stderr, flush=True)

    def handler(self, exn: Exception) -> bool:
        """webdataset error handler: a broken tar or member is logged and the stream goes on.
        webdataset adds the shard's URL to the exception's args, and sometimes its stream's repr to
        the message ("... @ <_io.BufferedReader ...>"): the line names the shard once. A failed
        HttpShard raises its one error again when the tar reader reads on: it is counted once."""
        if exn is self._last:
            return True
        self._last = exn
        url = next((a for a in exn.args[1:] if isinstance(a, str)), None)
        text, _, stream = str(exn.args[0] if exn.args else exn).partition(" @ <")
        named = re.search(r"name='([^']*)'", stream)
        url = url or (named.group(1) if named else None)
        self(f"shard {url}" if url else "a shard", f"{type(exn).__name__}: {text}")
        return True


HTTP_STALL_S = 60  # default of RESTORER_HTTP_STALL_S: an http(s) transfer with no byte for this long is abandoned
HTTP_RETRIES = 2  # default of RESTORER_HTTP_RETRIES: new tries of a shard that failed before its first byte
HTTP_RETRY_DELAY_S = 1.0  # before the first new try; doubled before each next one
HTTP_CONNECT_TIMEOUT_S = 30
_TRANSIENT_CURL_EXITS = {7, 35, 52, 55, 56}  # refused, TLS handshake, empty reply, send/recv failure (not 28: a timeout
# or a stall has already cost its full time once)
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}


class HttpShardError(OSError):
    """An http(s) shard could not be read to its end: curl's own words (the HTTP status, a dropped
    connection, a stall), and how many tries it took."""


def http_settings() -> tuple[int, int]:
    """(stall seconds, retries) for http(s) shards, from RESTORER_HTTP_STALL_S and RESTORER_HTTP_RETRIES.

    Environment variables, not config keys: they describe the network a run reads from, not the
    experiment, and the same run config should work from any cluster's store."""
    out = []
    for name, default, least in (("RESTORER_HTTP_STALL_S", HTTP_STALL_S, 1),
                                 ("RESTORER_HTTP_RETRIES", HTTP_RETRIES, 0)):
        text = os.environ.get(name, "").strip()
        if not text:
            out.append(default)
            continue
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            unit = "seconds" if least else "tries"
            raise ValueError(f"{name}: must be a whole number of {unit} >= {least}, got {text!r}")
        out.append(value)
    return out[0], out[1]


class HttpShard:
    """An http(s) shard streamed by curl and read like a file, whose failures are never silent.

    webdataset's own curl pipe (gopen_curl) retries 30 times 2 s apart (a 500 costs a minute), has
    no limit on a stalled transfer (a server that stops sending hangs the worker for good), and
    reports curl's failure only if curl happens to have exited by the time the tar reader sees the
    end of its output: otherwise a 404 reads as an "empty file" and a connection dropped between
    two members as a shorter, valid shard. Here:
    - curl runs with -f (an HTTP error is a failure) and -sS (quiet, but its error is kept), and
      abandons a transfer that moves no byte for `stall_s` seconds (--speed-limit 1 --speed-time),
      from a server that never answers as from one that stops mid-shard (curl judges the speed
      over its last few seconds: a stall after a burst of bytes is noticed up to ~5 s later); a
      reader that pauses (validation, a checkpoint) and leaves curl waiting on a full pipe does
      not trip it;
    - at the end of curl's output its exit status is always awaited: a failure raises
      HttpShardError with curl's message, naming the shard, and so does every later read (the
      same exception, which SkipLog counts once);
    - a shard that failed before its first byte in a way that may pass at once (refused, reset,
      408, 429, 5xx) is asked again up to `retries` times, 1 s, 2 s, ... apart; a timeout or a
      stall is not (it has cost its full time once: a read of a shard is bounded by about one
      stall limit or connect timeout). Never after a byte: curl's own --retry would then write a
      second copy of the shard after the first's partial bytes.
    """

    def __init__(self, url: str, stall_s: int = HTTP_STALL_S, retries: int = HTTP_RETRIES):
        self.url, self.stall_s, self.retries = url, stall_s, retries
        self.tries = self.received = 0
        self.ended = False
        self.error: Optional[HttpShardError] = None
        self.proc: Optional[subprocess.Popen] = None
        self._start()

    def __repr__(self) -> str:  # webdataset appends it to a member's error: SkipLog.handler finds the name
        return f"<HttpShard name='{self.url}'>"

    def _start(self) -> None:
        self.tries += 1
        cmd = ["curl", "-f", "-sS", "-L", "--connect-timeout", str(HTTP_CONNECT_TIMEOUT_S),
               "--speed-limit", "1", "--speed-time", str(self.stall_s), self.url]
        # its own session: a Ctrl-C or job signal meant for the trainer does not fail the shard being read
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)

    def read(self, size: int = -1) -> bytes:
        if self.error is not None:
            raise self.error
        while not self.ended:
            data = self.proc.stdout.read(size)  # blocks until `size` bytes or the end of curl's output
            if data or size == 0:
                self.received += len(data)
                return data
            status = self.proc.wait()
            if status == 0:
                self.close()
                break
            error = self._error(status)
            if self.received == 0 and self.tries <= self.retries and self._transient(status, error):
                self._stop()
                time.sleep(HTTP_RETRY_DELAY_S * 2 ** (self.tries - 1))
                self._start()
                continue
            self.close()
            self.error = HttpShardError(error + (f" (after {self.tries} tries)" if self.tries > 1 else ""))
            raise self.error
        return b""

    def _error(self, status: int) -> str:
        text = self.proc.stderr.read().decode(errors="replace").strip()
        line = text.splitlines()[-1] if text else (f"curl killed by signal {-status}" if status < 0
                                                    else f"curl exited with status {status}")
        if "too slow" in line:
            line += f" (a stalled transfer: RESTORER_HTTP_STALL_S={self.stall_s})"
        return line

    @staticmethod
    def _transient(status: int, error: str) -> bool:
        if status == 22:  # -f: an HTTP status >= 400
            code = re.search(r"error: (\d{3})", error)
            return bool(code) and int(code.group(1)) in _TRANSIENT_HTTP
        return status in _TRANSIENT_CURL_EXITS

    def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    def close(self) -> None:
        """End curl (if it still runs: the reader stopped early) and reap it; reads end here."""
        self.ended = True
        self._stop()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def open_shards(urls: list[str], handler) -> Iterator[dict]:
    """{"url", "stream"} for webdataset's tar reader, as its url_opener makes them: http(s) shards
    through HttpShard (each closed once the reader moves on), any other URL through webdataset's
    gopen (files, pipe:). A shard that cannot be opened goes to `handler`."""
    settings = None
    for url in urls:
        if settings is None and url.startswith(("http://", "https://")):
            settings = http_settings()  # a bad setting ends the run rather than skip every shard
        try:
            stream = HttpShard(url, *settings) if url.startswith(("http://", "https://")) else gopen(url)
        except Exception as exn:
            exn.args = exn.args + (url,)
            if handler(exn):
                continue
            break
        try:
            yield {"url": url, "stream": stream}
        finally:
            if isinstance(stream, HttpShard):
                stream.close()


def read_images(urls: list[str], skip: SkipLog, keep=None) -> Iterator[tuple[str, np.ndarray]]:
    """(key, decoded image) for every usable sample of the shards, in order; `keep(key)` filters.
    A shard that fails (not found, a broken tar, a dropped or stalled transfer) costs a warning and
    a count, and the stream goes on with the next one."""
    members = tar_file_expander(open_shards(urls, skip.handler), handler=skip.handler)
    for sample in group_by_keys(members, handler=skip.handler):
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


def _batch(pairs: list[tuple[bytes, np.ndarray]], out: Optional[np.ndarray] = None,
           qualities: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, qualities): uint8 N x H x W x C arrays, written into `out` (2 x N x H x W x C)
    if given, and each input's quality as its JPEG's tables say (float32 N, into `qualities`)."""
    if out is None:
        out = np.empty((2, len(pairs), *pairs[0][1].shape), np.uint8)
    if qualities is None:
        qualities = np.empty(len(pairs), np.float32)
    for i, (data, target) in enumerate(pairs):
        out[0, i], quality = jpeg.decode(data)
        qualities[i] = quality if quality is not None else 0.0
        out[1, i] = target
    return out[0], out[1], qualities


def to_tensors(inputs: np.ndarray, targets: np.ndarray, qualities: np.ndarray,
               pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 N x C x P x P tensors in channels-last memory (a permuted NHWC buffer): what the GPU's
    channels_last convolutions read, with no transpose on the CPU; and the N qualities (float32).
    Pinned for non-blocking copies."""
    out = (*(torch.from_numpy(a).permute(0, 3, 1, 2) for a in (inputs, targets)), torch.from_numpy(qualities))
    return tuple(t.pin_memory() for t in out) if pin_memory else out


PREFETCH = 4  # batches in flight per worker
RING = PREFETCH + 3  # batch slots per worker: those in flight, one being copied out, spares


def ring_bytes(cfg: DataConfig, batch_size: int) -> int:
    """Shared memory one rank's training loader takes: workers x slots x batch x ((input, target) x C x P x P
    bytes + a float32 quality)."""
    p = cfg.patch.size
    return cfg.workers * RING * batch_size * (2 * cfg.patch.channels * p * p + 4)


def shm_problem(need: int, free: int, workers: int) -> Optional[str]:
    """Why the batch rings of a node's ranks (`need` bytes together) will not fit in `free` bytes of
    /dev/shm, or None."""
    if need <= free:
        return None
    mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    return (f"the DataLoader workers' batch rings need {mib(need)} of shared memory on this node, /dev/shm has "
            f"{mib(free)} free: give the container more (docker --shm-size=2g, or --ipc=host), or lower "
            f"data.workers (now {workers}) or train.batch_size")


class TrainPatches(IterableDataset):
    """An endless stream of training batches for one rank; the DataLoader takes as many as it needs.

    DataLoader workers write each batch into a slot of a shared-memory ring made once per epoch
    (the pixels, and beside them each input's quality) and hand over only (worker, slot). Pickling 1.5 MB batches through a pipe, or torch's fresh
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
        self.quality_ring = (torch.empty((cfg.workers, RING, batch_size), dtype=torch.float32).share_memory_()
                             if cfg.workers else None)

    def batch(self, item) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (inputs, targets, qualities) an item of this dataset stands for; a ring slot is copied out."""
        pair, qualities = self.view(item)
        return (pair[0], pair[1], qualities) if self.ring is None else (pair[0].copy(), pair[1].copy(), qualities.copy())

    def view(self, item) -> tuple[np.ndarray, np.ndarray]:
        """The 2 x N x P x P x C uint8 pair and the N qualities an item stands for, not copied (a
        ring slot stays the worker's to reuse: copy it before asking the loader for more)."""
        if self.ring is None:
            return np.stack(item[:2]), item[2]
        worker, slot = item
        return self.ring[worker, slot].numpy(), self.quality_ring[worker, slot].numpy()

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
            nonlocal mine, keep
            while True:  # one pass over this stream's shards in a fresh order each time
                order = [mine[i] for i in rng.permutation(len(mine))]
                n = 0
                for _, image in read_images(order, skip, keep):
                    n += 1
                    yield image
                if n:
                    continue
                # nothing usable here: widen the net rather than end the run while any data is readable
                if len(mine) < len(self.urls):
                    print(f"restorer: warning: {skip.where}: no usable image in its {len(mine)} shard(s) "
                          f"({skip.count} skipped); reading all shards for its share instead", file=sys.stderr, flush=True)
                    mine, keep = self.urls, (lambda key: _owner(key, streams) == stream)
                elif keep is not None:  # a tiny set: no usable sample hashed to this stream
                    keep = None
                else:
                    raise NoTrainingData(f"no usable training image in any of the {len(self.urls)} shards "
                                         f"({skip.count} samples or shards skipped)")

        ring = self.ring[worker].numpy() if self.ring is not None else None
        quality_ring = self.quality_ring[worker].numpy() if self.ring is not None else None
        buffer: list[tuple[bytes, np.ndarray]] = []
        batch: list[tuple[bytes, np.ndarray]] = []
        made = 0
        for image in images():
            for _ in range(k):
                pair = training_pair(image, cfg.patch, cfg.jpeg, rng)
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
                        _batch(batch, out=ring[made % RING], qualities=quality_ring[made % RING])
                        yield worker, made % RING
                    made += 1
                    batch = []


class ValPairs(IterableDataset):
    """Every validation image exactly once across all ranks and workers, at each validation quality:
    (input, target, quality, key) with batch 1 (crops may differ in size). Deterministic: fixed
    centre crops, fixed qualities, the chroma of data.jpeg (with `random`, one fixed per image)."""

    def __init__(self, urls: list[str], cfg: DataConfig, *, rank: int, world_size: int):
        self.urls, self.cfg, self.rank, self.world_size = list(urls), cfg, rank, world_size

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
        worker, _, stream, streams = _stream_id(self.rank, self.world_size)
        skip = SkipLog(f"rank {self.rank} val worker {worker}")
        cfg = self.cfg
        for key, image in read_images(self.urls, skip, keep=lambda key: _owner(key, streams) == stream):
            target = center_crop(image, cfg.val_crop, cfg.patch.grayscale)
            for quality in cfg.val_qualities:
                yield *_batch([jpeg.compress(target, quality, jpeg.val_chroma(cfg.jpeg, key))]), key


def _mp_context(workers: int):
    """fork, as the shutdown event shared with the workers was made for (Python 3.14 defaults to forkserver)."""
    return multiprocessing.get_context("fork") if workers else None


def _worker_init():
    """worker_init_fn: torchrun and SLURM signal every process of a job; the trainer decides when to
    stop (after saving), so its workers outlive that signal, and end with the trainer (restorer.stop)."""
    return functools.partial(worker_signals, shutdown_event())


def _as_is(batch):
    """collate_fn: keep numpy arrays as they are (the default converts them to tensors in the worker)."""
    return batch


class EpochLoader:
    """Exactly `steps` batches of one epoch: `len()` is the step count, iteration ends there.

    Batches arrive on `device`. On CUDA each one is copied once, out of the workers' shared-memory
    ring into a preallocated pinned buffer, then uploaded on a side stream while the step before it
    runs: the training step never waits for a copy (it waits on the upload's event on the device).
    """

    def __init__(self, loader: DataLoader, steps: int, device: torch.device = torch.device("cpu")):
        self.loader, self.steps, self.device = loader, steps, device
        self._uploader: Optional[Uploader] = None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        items = itertools.islice(iter(self.loader), self.steps)
        if self.device.type != "cuda":
            for item in items:
                yield to_tensors(*self.loader.dataset.batch(item))
            return
        if self._uploader is None:
            self._uploader = Uploader(self.device)
        yield from self._uploader.run(self.loader.dataset, items)


class Uploader:
    """Host-to-device transfer of uint8 batch pairs (and their qualities), one batch ahead, through a
    few pinned buffers reused once their upload's event has completed."""

    DEPTH = 3  # pinned buffer pairs: one being filled, one uploading, one spare

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.buffers: list[Optional[torch.Tensor]] = [None] * self.DEPTH
        self.quality_buffers: list[Optional[torch.Tensor]] = [None] * self.DEPTH
        self.events: list[Optional[torch.cuda.Event]] = [None] * self.DEPTH
        self.n = 0

    def _upload(self, dataset, item) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.cuda.Event]:
        i = self.n % self.DEPTH
        self.n += 1
        if self.events[i] is not None:
            self.events[i].synchronize()  # its last upload has finished: the buffer is free (long since)
        view, qualities = dataset.view(item)  # (2, N, P, P, C) uint8 and (N,) float32: the worker's ring slot
        if self.buffers[i] is None or self.buffers[i].shape != view.shape:
            self.buffers[i] = torch.empty(view.shape, dtype=torch.uint8, pin_memory=True)
            self.quality_buffers[i] = torch.empty(qualities.shape, dtype=torch.float32, pin_memory=True)
        pinned, pinned_q = self.buffers[i], self.quality_buffers[i]
        np.copyto(pinned.numpy(), view)  # the one host copy; the ring slot is free after it
        np.copyto(pinned_q.numpy(), qualities)
        with torch.cuda.stream(self.stream):
            on_device = pinned.to(self.device, non_blocking=True).permute(0, 1, 4, 2, 3)  # 2 x N x C x P x P
            q_on_device = pinned_q.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[i] = event
        return on_device[0], on_device[1], q_on_device, event

    def run(self, dataset, items) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        ahead = None
        for item in items:
            nxt = self._upload(dataset, item)
            if ahead is not None:
                yield self._hand_over(*ahead)
            ahead = nxt
        if ahead is not None:
            yield self._hand_over(*ahead)

    def _hand_over(self, x: torch.Tensor, y: torch.Tensor, q: torch.Tensor, event) -> tuple[torch.Tensor, ...]:
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)  # on the device: the step's kernels start after the upload
        for t in (x, y, q):
            t.record_stream(current)  # the allocator must not hand this memory out while the step uses it
        return x, y, q


def train_loader(cfg: DataConfig, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, step: int = 0, steps: Optional[int] = None, device="cpu") -> EpochLoader:
    """Training batches for this rank, epoch after epoch: each `iter()` yields one epoch of
    (input, target) uint8 N x C x P x P and the inputs' N qualities (float32, from their JPEG's
    tables), and the next one continues the same streams.

    `steps` (per epoch) defaults to `steps_per_epoch`; it is the same on every rank whatever the
    shards. `epoch` and `step` say where the run starts (a resumed run starts later); with the
    seed, the rank and the worker they seed the streams, so a resumed run does not replay patches.
    """
    dataset = TrainPatches(split_urls(cfg, "train"), cfg, batch_size=batch_size, seed=seed, rank=rank,
                           world_size=world_size, epoch=epoch, step=step)
    loader = DataLoader(dataset, batch_size=None, collate_fn=_as_is, worker_init_fn=_worker_init(), num_workers=cfg.workers,
                        prefetch_factor=PREFETCH if cfg.workers else None, persistent_workers=cfg.workers > 0,
                        multiprocessing_context=_mp_context(cfg.workers))
    return EpochLoader(loader, steps if steps is not None else steps_per_epoch(cfg, batch_size, world_size),
                       torch.device(device))


def val_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1,
               pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]]:
    """This rank's share of the validation images at each validation quality: (input, target,
    quality, key), batch 1, deterministic."""
    dataset = ValPairs(split_urls(cfg, "val"), cfg, rank=rank, world_size=world_size)
    workers = min(cfg.workers, 2)
    for inputs, targets, qualities, key in DataLoader(dataset, batch_size=None, collate_fn=_as_is,
                                                      worker_init_fn=_worker_init(), num_workers=workers,
                                                      multiprocessing_context=_mp_context(workers)):
        yield *to_tensors(inputs, targets, qualities, pin_memory), key
