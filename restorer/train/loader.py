"""The training and validation pipelines: shards -> per-worker patches -> uint8 batches, the same
number of steps on every rank.

From a shard folder (data.shards) the training stream is a function of integers (restorer.data.stream):
the slots of the global batch, each image read by random access, each patch seeded by (seed, epoch,
image, patch). A rank owns its slots, its DataLoader workers share them (LanePatches), and a step's
parts are put together in the main process: the same samples whatever the world size, the worker
count and grad_accum, and a resumed run seeks to its step.

From URLs (train_urls: http, pipe:, brace patterns) the shards are streamed (StreamPatches): every
(rank, worker) pair reads its own shards in order, decodes each image once, cuts patches_per_image
pairs from it and mixes them in a shuffle buffer. Streams never run dry: they cycle over their shards,
reshuffled on every pass. webdataset does what it is best at there: URL expansion, opening files and
`pipe:` commands, and tar reading. http(s) shards are streamed by curl through HttpShard, which bounds
a stalled or trickling transfer and never lets a failed one pass as a short shard.

Why not webdataset's own `shardshuffle`, `shuffle` and `with_epoch`: they seed from the pid and the
clock (not reproducible), reuse one shard order every epoch, and count per worker.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import multiprocessing
import os
import re
import select
import signal
import subprocess
import sys
import time
import zlib
from typing import Iterator, NamedTuple, Optional
from urllib.parse import urlsplit

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from restorer.base.cli import warn
from restorer.data import jpeg
from restorer.data.decode import ImageDecodeError, decode_image
from restorer.formats.config import ConfigError, DataConfig, check_shard_urls, expand_shard_urls
from restorer.data.patches import center_crop, training_pair
from restorer.data.stream import (IMAGE_MEMBERS, ImageReader, NoImage, SampleIndex, StreamPlan, index_shards,
                                  lane_patches, rank_lanes, worker_lanes)
from restorer.base.errors import RunError
from restorer.data.manifest import load_manifest, shard_paths
from restorer.train.stop import shutdown_event, stop_signals_held, worker_signals
from restorer.base.urls import mask_secrets, shard_url_problem

def split_urls(cfg: DataConfig, split: str) -> list[str]:
    """The shard URLs of a split: the explicit pattern if given, else the manifest's list; each one
    a URL the pipeline may open (ConfigError, one line, naming the first that is not)."""
    key = "train_urls" if split == "train" else "val_urls"
    try:
        if getattr(cfg, key):
            return expand_shard_urls(getattr(cfg, key), cfg.allow_pipe)
        if not cfg.shards:
            return []
        key = "shards"
        urls = shard_paths(cfg.shards, split)
        check_shard_urls(urls, cfg.allow_pipe)
        return urls
    except ValueError as e:
        raise ConfigError(f"data.{key}: {e}") from None


class NoTrainingData(RunError):
    """Not one training image could be read from any shard; the message is one line.

    Raised in a DataLoader worker, it reaches the trainer rebuilt by the DataLoader from the
    worker's traceback text ("Caught NoTrainingData in DataLoader worker ... Original Traceback
    ... NoTrainingData: <message>"): the message is that text's last line, without its prefix."""

    def __init__(self, message: str) -> None:
        last = str(message).strip().splitlines()[-1] if str(message).strip() else str(message)
        super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1])


def uses_lanes(cfg: DataConfig) -> bool:
    """The training images come from a shard folder's manifest (local files read by random access:
    restorer.data.stream's lanes, resumable to the patch), not from train_urls (streamed)."""
    return not cfg.train_urls and bool(cfg.shards)


def training_images(cfg: DataConfig) -> int:
    """The training images the manifest lists (every rank numbers them alike)."""
    return load_manifest(cfg.shards)["splits"]["train"]["samples"]


def steps_per_epoch(cfg: DataConfig, batch_size: int, world_size: int, grad_accum: int = 1) -> int:
    """Optimizer steps per epoch, identical on every rank, a function of the global batch (world size x
    batch_size x grad_accum) alone. From a manifest: an epoch gives `patches_per_image` patches of
    N // global batch images to every slot of the global batch (each slot takes its own images; the
    rest wait for another epoch's order); data.epoch_samples (patches) sets another length."""
    global_batch = batch_size * world_size * grad_accum
    if cfg.epoch_samples:
        return max(1, cfg.epoch_samples // global_batch)
    if uses_lanes(cfg):
        return max(1, training_images(cfg) // global_batch) * cfg.patches_per_image
    return max(1, training_images(cfg) * cfg.patches_per_image // global_batch)


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
            warn(f"skipped {what}: {reason} ({self.count} skipped so far by {self.where})")

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


HTTP_STALL_S = 60  # default of RESTORER_HTTP_STALL_S: the window over which a transfer is judged too slow
HTTP_MIN_RATE = 1024  # default of RESTORER_HTTP_MIN_RATE: bytes/s, at least, while the reader waits on the transfer
HTTP_RETRIES = 2  # default of RESTORER_HTTP_RETRIES: new tries of a shard that failed before its first byte
HTTP_RETRY_DELAY_S = 1.0  # before the first new try; doubled before each next one
HTTP_CONNECT_TIMEOUT_S = 30
_TRANSIENT_CURL_EXITS = {7, 35, 52, 55, 56}  # refused, TLS handshake, empty reply, send/recv failure (not a
# stall: it has already cost its full time once)
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
_CURL_REMEDIES = {60: "trust its certificate with CURL_CA_BUNDLE=/path/to/ca.pem"}  # curl's exit status: what to do


class HttpShardError(OSError):
    """An http(s) shard could not be read to its end: curl's own words (the HTTP status, a dropped
    connection), a transfer too slow, and how many tries it took."""


class HttpSettings(NamedTuple):
    stall_s: int
    retries: int
    min_rate: int


def http_settings() -> HttpSettings:
    """The settings of http(s) shards, from RESTORER_HTTP_STALL_S, RESTORER_HTTP_RETRIES and
    RESTORER_HTTP_MIN_RATE.

    Environment variables, not config keys: they describe the network a run reads from, not the
    experiment, and the same run config should work from any cluster's store."""
    out = []
    for name, default, least, unit in (("RESTORER_HTTP_STALL_S", HTTP_STALL_S, 1, "seconds"),
                                       ("RESTORER_HTTP_RETRIES", HTTP_RETRIES, 0, "tries"),
                                       ("RESTORER_HTTP_MIN_RATE", HTTP_MIN_RATE, 0, "bytes/s")):
        text = os.environ.get(name, "").strip()
        if not text:
            out.append(default)
            continue
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise ValueError(f"{name}: must be a whole number of {unit} >= {least}, got {text!r}")
        out.append(value)
    return HttpSettings(*out)


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """In a process just made (a preexec_fn, a worker_init_fn): be killed when `parent` ends, so a
    killed trainer leaves no loader worker and no curl behind (Linux; elsewhere nothing). The kernel
    sends the signal when the *thread* that made the process ends: the loaders and the shards are
    read in the thread that iterates them, the trainer's main thread or a worker's."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the prctl
        os._exit(1)


def _curl_config(url: str) -> bytes:
    """curl's config (`-K -`) naming `url`: a URL with a password never appears on a command line,
    which every user of the machine can read in `ps`."""
    quoted = url.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'url = "{quoted}"\n'.encode()


class HttpShard:
    """An http(s) shard streamed by curl and read like a file, whose failures are never silent.

    webdataset's own curl pipe (gopen_curl) retries 30 times 2 s apart (a 500 costs a minute), has
    no limit on a stalled transfer (a server that stops sending hangs the worker for good), and
    reports curl's failure only if curl happens to have exited by the time the tar reader sees the
    end of its output: otherwise a 404 reads as an "empty file" and a connection dropped between
    two members as a shorter, valid shard. Here:
    - curl runs with -f (an HTTP error is a failure) and -sS (quiet, but its error is kept); it gets
      the URL on its stdin (`-K -`), not on its command line (a password in it stays private), and
      is killed with the process that reads it (die_with_parent), or when the reader closes it;
    - a transfer too slow is abandoned: the reader measures the rate at which bytes arrive while it
      waits for them, and once it has waited `stall_s` seconds (in all, since the last judgement)
      for fewer than `min_rate` bytes a second, the shard fails. That catches a server that never
      answers, one that stops mid-shard and one that trickles a few bytes a second. The time the
      reader spends elsewhere (training, validation, a checkpoint: curl then waits on a full pipe)
      is not counted: a slow reader is not a slow server. curl's own speed limit could not tell them
      apart;
    - at the end of curl's output its exit status is always awaited: a failure raises
      HttpShardError with curl's message (the line that says the cause), naming the shard, and so
      does every later read (the same exception, which SkipLog counts once);
    - a shard that failed before its first byte in a way that may pass at once (refused, reset,
      408, 429, 5xx) is asked again up to `retries` times, 1 s, 2 s, ... apart; a stall is not (it
      has cost its full time once: a read of a shard waits at most about one stall window, or the
      connect timeout, per try). Never after a byte: curl's own --retry would then write a second
      copy of the shard after the first's partial bytes.
    """

    def __init__(self, url: str, stall_s: int = HTTP_STALL_S, retries: int = HTTP_RETRIES,
                 min_rate: int = HTTP_MIN_RATE):
        self.url, self.stall_s, self.retries, self.min_rate = url, stall_s, retries, min_rate
        self.tries = self.received = 0
        self.ended = False
        self.error: Optional[HttpShardError] = None
        self.proc: Optional[subprocess.Popen] = None
        self._start()

    def __repr__(self) -> str:  # webdataset appends it to a member's error: SkipLog.handler finds the name
        return f"<HttpShard name='{mask_secrets(self.url)}'>"

    def _start(self) -> None:
        self.tries += 1
        self.waited, self.waited_bytes, self._after_wait = 0.0, 0, False  # the rate's window (see _wait)
        # -N: each byte reaches the reader as it arrives (stdio would hold it back by 4 KiB), so the rate is the server's;
        # -g: webdataset has expanded the braces, curl must not read [] or {} again (nor an IPv6 host's brackets)
        cmd = ["curl", "-f", "-sS", "-L", "-N", "-g", "--connect-timeout", str(HTTP_CONNECT_TIMEOUT_S), "-K", "-"]
        # its own session: a Ctrl-C or job signal meant for the trainer does not fail the shard being read
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     bufsize=0, start_new_session=True,
                                     preexec_fn=functools.partial(die_with_parent, os.getpid()))
        try:
            self.proc.stdin.write(_curl_config(self.url))  # a few hundred bytes: the pipe takes them at once
        except BrokenPipeError:
            pass  # curl is gone already: its exit status says why
        finally:
            self.proc.stdin.close()
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._poll = select.poll()  # (not select.select: a trainer may hold more than its 1024 descriptors)
        self._poll.register(self.proc.stdout.fileno(), select.POLLIN)

    def read(self, size: int = -1) -> bytes:
        if self.error is not None:
            raise self.error
        while not self.ended:
            data = self._read(size)  # `size` bytes, or fewer at the end of curl's output
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
            self._fail(error + (f" (after {self.tries} tries)" if self.tries > 1 else ""))
        return b""

    def _read(self, size: int) -> bytes:
        chunks, n = [], 0
        fd = self.proc.stdout.fileno()
        while size < 0 or n < size:
            try:
                chunk = os.read(fd, min(size - n, 1 << 20) if size >= 0 else 1 << 20)
            except BlockingIOError:  # nothing there: the reader waits for the server
                self._wait()
                continue
            if not chunk:
                break
            if self._after_wait:
                self.waited_bytes += len(chunk)
                self._after_wait = False
            chunks.append(chunk)
            n += len(chunk)
        return b"".join(chunks)

    def _wait(self) -> None:
        """Wait for curl's next bytes, and judge the transfer each time the reader has waited
        `stall_s` seconds in all: fewer than `min_rate` bytes a second arrived meanwhile (or none)
        fails the shard."""
        if self.waited >= self.stall_s:
            if self.waited_bytes < max(self.min_rate * self.waited, 1):
                self._fail(f"too slow: {self.waited_bytes} bytes in the {self.waited:.0f} s the reader waited, under "
                           f"{self.min_rate} bytes/s (RESTORER_HTTP_STALL_S={self.stall_s}, "
                           f"RESTORER_HTTP_MIN_RATE={self.min_rate})")
            self.waited, self.waited_bytes = 0.0, 0
        start = time.monotonic()
        self._poll.poll(math.ceil((self.stall_s - self.waited) * 1000))
        self.waited += time.monotonic() - start
        self._after_wait = True

    def _fail(self, error: str) -> None:
        self.close()
        self.error = HttpShardError(error)
        raise self.error

    def _error(self, status: int) -> str:
        """curl's message: the line that says the cause ("curl: (60) SSL certificate problem: ..."),
        not the advice under it, and what to do where there is something to do."""
        lines = [line for line in self.proc.stderr.read().decode(errors="replace").splitlines() if line.strip()]
        causes = [line for line in lines if line.startswith("curl: (")]
        line = (causes or lines or [f"curl killed by signal {-status}" if status < 0
                                    else f"curl exited with status {status}"])[-1].strip()
        return f"{line} ({_CURL_REMEDIES[status]})" if status in _CURL_REMEDIES else line

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


class RefusedURL(ValueError):
    """A URL the pipeline must not open (restorer.base.urls.shard_url_problem)."""


def open_shards(urls: list[str], handler, allow_pipe: bool = False) -> Iterator[dict]:
    """{"url", "stream"} for webdataset's tar reader, as its url_opener makes them: http(s) shards
    through HttpShard (each closed once the reader moves on), plain paths, file: and (`allow_pipe`)
    pipe: through webdataset's gopen; any other URL is refused here too, whatever the config's
    validation saw. A shard that cannot be opened goes to `handler`."""
    settings = None
    for url in urls:
        problem = shard_url_problem(url, allow_pipe)
        http = not problem and urlsplit(url).scheme in ("http", "https")
        if http and settings is None:
            settings = http_settings()  # a bad setting ends the run rather than skip every shard
        try:
            if problem:
                raise RefusedURL(problem)
            stream = HttpShard(url, *settings) if http else gopen(url)
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


def read_images(urls: list[str], skip: SkipLog, keep=None, allow_pipe: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """(key, decoded image) for every usable sample of the shards, in order; `keep(key)` filters;
    pipe: URLs are opened only with `allow_pipe`. A shard that fails (not found, a broken tar, a
    dropped or stalled transfer, a URL refused) costs a warning and a count, and the stream goes
    on with the next one."""
    members = tar_file_expander(open_shards(urls, skip.handler, allow_pipe), handler=skip.handler)
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


PREFETCH = 4  # items in flight per worker, at least
# patches in flight per worker, at least: a worker that stops to decode an image (40-300 ms) still has
# items made ahead, so the others are not kept waiting for it (bench/loader.py: with a step's lanes as
# the item, 4 items in flight cost 15% of the throughput)
LOOKAHEAD_PATCHES = 128
SPARE_SLOTS = 3  # ring slots per worker beyond those in flight: one being copied out, spares


def prefetch(patches_per_item: int) -> int:
    """Items a worker has in flight (the DataLoader's prefetch_factor)."""
    return max(PREFETCH, -(-LOOKAHEAD_PATCHES // patches_per_item))


def ring_slots(patches_per_item: int) -> int:
    """A worker's slots in the ring: its items in flight and the spares."""
    return prefetch(patches_per_item) + SPARE_SLOTS


def item_patches(cfg: DataConfig, batch_size: int, grad_accum: int = 1) -> int:
    """The patches of one worker's item: its share of the rank's lanes of a step (from a shard folder)
    or a micro-batch (train_urls)."""
    if not uses_lanes(cfg):
        return batch_size
    lanes = batch_size * grad_accum
    return -(-lanes // max(min(cfg.workers, lanes), 1))


def ring_bytes(cfg: DataConfig, batch_size: int, grad_accum: int = 1) -> int:
    """Shared memory one rank's training loader takes: workers x slots x the patches of a slot
    ((input, target) x C x P x P bytes, a float32 quality, three int64 numbers)."""
    p, workers = cfg.patch.size, min(cfg.workers, batch_size * grad_accum)
    per_slot = item_patches(cfg, batch_size, grad_accum)
    return workers * ring_slots(per_slot) * per_slot * (2 * cfg.patch.channels * p * p + 4 + 24)


def shm_problem(need: int, free: int, workers: int) -> Optional[str]:
    """Why the batch rings of a node's ranks (`need` bytes together) will not fit in `free` bytes of
    /dev/shm, or None."""
    if need <= free:
        return None
    mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    return (f"the DataLoader workers' batch rings need {mib(need)} of shared memory on this node, /dev/shm has "
            f"{mib(free)} free: give the container more (docker --shm-size=2g, or --ipc=host), or lower "
            f"data.workers (now {workers}) or train.batch_size")


class Ring:
    """Slots of patches in shared memory, made before the workers fork: a worker writes a
    slot's pixels, qualities and (lane, image, patch) numbers, and hands over only (worker, slot).
    Pickling 1.5 MB batches through a pipe, or torch's fresh shared-memory segment per tensor, cost
    15-25% of the workers' time (bench/loader.py). The main process copies a slot out (into pinned
    memory on CUDA) before the worker can reuse it: a worker has at most `prefetch` items in flight,
    and the ring has SPARE_SLOTS more slots than that."""

    def __init__(self, workers: int, patches: int, size: int, channels: int):
        self.prefetch, self.slots = prefetch(patches), ring_slots(patches)
        shape = (workers, self.slots, patches)
        self.pairs = torch.empty((workers, self.slots, 2, patches, size, size, channels), dtype=torch.uint8).share_memory_()
        self.qualities = torch.empty(shape, dtype=torch.float32).share_memory_()
        self.ids = torch.zeros((*shape, 3), dtype=torch.int64).share_memory_()

    def write(self, worker: int, slot: int, pairs: list, ids: Optional[np.ndarray]) -> None:
        n = len(pairs)
        _batch(pairs, out=self.pairs[worker, slot, :, :n].numpy(), qualities=self.qualities[worker, slot, :n].numpy())
        if ids is not None:
            self.ids[worker, slot, :n] = torch.from_numpy(ids)

    def read_into(self, worker: int, slot: int, out: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Copy a slot's first len(out[1]) patches into `out`: (2 x n x P x P x C pairs, n qualities, n x 3 numbers)."""
        n = len(out[1])
        for target, source in zip(out, (self.pairs[worker, slot, :, :n], self.qualities[worker, slot, :n],
                                        self.ids[worker, slot, :n])):
            np.copyto(target, source.numpy())


def _worker() -> tuple[int, int]:
    """(this DataLoader worker's id, the workers) in a worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class LanePatches(IterableDataset):
    """One rank's lanes of the global batch (restorer.data.stream), step after step from `step`: each
    DataLoader worker makes its share of the lanes (every workers-th), one item a step; the main process
    puts a step's items together in worker order and cuts them into grad_accum micro-batches.
    Without workers (workers=0) the items are plain arrays."""

    def __init__(self, index: SampleIndex, plan: StreamPlan, cfg: DataConfig, *, lanes: range, step: int,
                 workers: int, rank: int):
        self.index, self.plan, self.cfg, self.lanes, self.step = index, plan, cfg, lanes, step
        self.workers, self.rank = workers, rank
        widest = max(len(worker_lanes(lanes, w, max(workers, 1))) for w in range(max(workers, 1)))
        self.ring = Ring(workers, widest, cfg.patch.size, cfg.patch.channels) if workers else None
        self._stream: Optional[Iterator] = None

    def __iter__(self) -> Iterator:
        if self._stream is None:  # (a DataLoader iterator made again goes on where the last one stopped)
            self._stream = self._generate()
        return self._stream

    def _generate(self) -> Iterator:
        worker, workers = _worker()
        reader = ImageReader(self.index)
        skip = SkipLog(f"rank {self.rank} worker {worker}")
        cfg = self.cfg
        try:
            patches = lane_patches(self.plan, worker_lanes(self.lanes, worker, workers), self.step, reader,
                                   cfg.patch, cfg.jpeg, skip)
            for made, (pairs, ids) in enumerate(patches):
                if self.ring is None:
                    inputs, targets, qualities = _batch(pairs)
                    yield np.stack([inputs, targets]), qualities, ids
                else:
                    self.ring.write(worker, made % self.ring.slots, pairs, ids)
                    yield worker, made % self.ring.slots
        except NoImage as e:
            raise NoTrainingData(str(e)) from None
        finally:
            reader.close()

    def micro_batches(self, items: Iterator, steps: int, grad_accum: int) -> Iterator[tuple]:
        """`steps` steps of grad_accum micro-batches: (2 x b x P x P x C pairs, b qualities, b x 3 numbers),
        each worker's part of a step copied once, out of its ring slot into the step's arrays."""
        workers = max(self.workers, 1)
        parts = [worker_lanes(self.lanes, w, workers) for w in range(workers)]
        n, b, p, c = len(self.lanes), len(self.lanes) // grad_accum, self.cfg.patch.size, self.cfg.patch.channels
        for _ in range(steps):
            pairs, qualities = np.empty((2, n, p, p, c), np.uint8), np.empty(n, np.float32)
            ids = np.empty((n, 3), np.int64)
            for w, mine in enumerate(parts):  # item k comes from worker k % workers
                at = slice(w, n, workers)  # its lanes: every workers-th of the rank's
                item = next(items)
                if self.ring is None:
                    pairs[:, at], qualities[at], ids[at] = item
                else:
                    self.ring.read_into(*item, (pairs[:, at], qualities[at], ids[at]))
            for m in range(grad_accum):
                yield pairs[:, m * b:(m + 1) * b], qualities[m * b:(m + 1) * b], ids[m * b:(m + 1) * b]


class StreamPatches(IterableDataset):
    """An endless stream of training micro-batches for one rank from shards named by URLs (train_urls:
    http, pipe:, brace patterns), read in order; the DataLoader takes as many as it needs.

    Every (rank, DataLoader worker) pair is one stream. A stream reads its own shards (or, when there
    are fewer shards than streams, every shard but only the samples whose key hashes to it: a
    warning says so), decodes each image once, cuts `patches_per_image` pairs from it, mixes them in
    a shuffle buffer and batches them. Streams never run dry: they cycle over their shards, reshuffled
    on every pass. Seeded with (seed, rank, worker, step): a resumed run does not replay patches, but
    it does not continue the stream it stopped either (that takes a shard folder: LanePatches).
    """

    def __init__(self, urls: list[str], cfg: DataConfig, *, batch_size: int, seed: int, rank: int,
                 world_size: int, step: int = 0):
        if not urls:
            raise ValueError("no training shards")
        self.urls, self.cfg, self.batch_size = list(urls), cfg, batch_size
        self.seed, self.rank, self.world_size, self.step = seed, rank, world_size, step
        self._stream: Optional[Iterator] = None
        self.ring = Ring(cfg.workers, batch_size, cfg.patch.size, cfg.patch.channels) if cfg.workers else None

    def micro_batches(self, items: Iterator, steps: int, grad_accum: int) -> Iterator[tuple]:
        p, c = self.cfg.patch.size, self.cfg.patch.channels
        for item in itertools.islice(items, steps * grad_accum):
            if self.ring is None:
                yield np.stack(item[:2]), item[2], None
                continue
            pairs, qualities = np.empty((2, self.batch_size, p, p, c), np.uint8), np.empty(self.batch_size, np.float32)
            self.ring.read_into(*item, (pairs, qualities, np.empty((self.batch_size, 3), np.int64)))
            yield pairs, qualities, None

    def __iter__(self) -> Iterator:
        """The stream goes on where the last epoch left it (each worker keeps its copy of this object),
        so the shards are read through in turn over a run rather than from the start every epoch."""
        if self._stream is None:
            self._stream = self._generate()
        return self._stream

    def _generate(self) -> Iterator:
        worker, workers = _worker()
        stream, streams = self.rank * workers + worker, self.world_size * workers
        rng = np.random.default_rng([self.seed, self.rank, worker, self.step])
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
                for _, image in read_images(order, skip, keep, cfg.allow_pipe):
                    n += 1
                    yield image
                if n:
                    continue
                # nothing usable here: widen the net rather than end the run while any data is readable
                if len(mine) < len(self.urls):
                    warn(f"{skip.where}: no usable image in its {len(mine)} shard(s) "
                         f"({skip.count} skipped); reading all shards for its share instead")
                    mine, keep = self.urls, (lambda key: _owner(key, streams) == stream)
                elif keep is not None:  # a tiny set: no usable sample hashed to this stream
                    keep = None
                else:
                    raise NoTrainingData(f"no usable training image in any of the {len(self.urls)} shards "
                                         f"({skip.count} samples or shards skipped)")

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
                    if self.ring is None:
                        yield _batch(batch)
                    else:
                        self.ring.write(worker, made % self.ring.slots, batch, None)
                        yield worker, made % self.ring.slots
                    made += 1
                    batch = []


class ValPairs(IterableDataset):
    """Every validation image exactly once across all ranks and workers, at each validation quality:
    (input, target, quality, key) with batch 1 (crops may differ in size). Deterministic: fixed
    centre crops, fixed qualities, the chroma of data.jpeg (with `random`, one fixed per image)."""

    def __init__(self, urls: list[str], cfg: DataConfig, *, rank: int, world_size: int):
        self.urls, self.cfg, self.rank, self.world_size = list(urls), cfg, rank, world_size

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
        worker, workers = _worker()
        stream, streams = self.rank * workers + worker, self.world_size * workers
        skip = SkipLog(f"rank {self.rank} val worker {worker}")
        cfg = self.cfg
        for key, image in read_images(self.urls, skip, lambda key: _owner(key, streams) == stream, cfg.allow_pipe):
            target = center_crop(image, cfg.val_crop, cfg.patch.grayscale)
            for quality in cfg.val_qualities:
                yield *_batch([jpeg.compress(target, quality, jpeg.val_chroma(cfg.jpeg, key))]), key


def _mp_context(workers: int):
    """fork, as the shutdown event shared with the workers was made for (Python 3.14 defaults to forkserver)."""
    return multiprocessing.get_context("fork") if workers else None


def _worker_init():
    """worker_init_fn: torchrun and SLURM signal every process of a job; the trainer decides when to
    stop (after saving), so its workers outlive that signal, and end with the trainer (restorer.train.stop);
    a trainer killed outright takes them with it (a worker waiting on a shard would never notice)."""
    return functools.partial(_init_worker, shutdown_event(), os.getpid())


def _init_worker(shutdown, trainer: int, worker_id: int) -> None:
    die_with_parent(trainer)
    worker_signals(shutdown, worker_id)


def _as_is(batch):
    """collate_fn: keep numpy arrays as they are (the default converts them to tensors in the worker)."""
    return batch


class EpochLoader:
    """Exactly `steps` steps of grad_accum micro-batches an epoch: `len()` is the step count, an
    iteration ends there and the next one goes on with the same stream (one DataLoader iterator
    for the whole run: a new one would drop the items its workers had made ahead).

    Micro-batches arrive on the CPU (or the device `on` names) as (input, target) uint8 N x C x P x P
    and the N qualities. On CUDA each one is copied once, out of the workers' shared-memory ring into a
    preallocated pinned buffer, then uploaded on a side stream while the step before it runs: the
    training step never waits for a copy (it waits on the upload's event on the device). With `trace`,
    the (lane, image, patch) numbers of the micro-batches given out wait in `traced` (lanes only)
    until taken.
    """

    def __init__(self, loader: DataLoader, steps: int, grad_accum: int = 1, trace: bool = False,
                 stream: Optional[dict] = None, step: int = 0):
        self.loader, self.steps, self.grad_accum, self.device = loader, steps, grad_accum, torch.device("cpu")
        self.trace = trace
        self.traced: list[np.ndarray] = []
        self.stream = stream or {}  # what the stream is a function of (train_loader says)
        self.position = step  # the steps whose micro-batches were all given out
        self._items: Optional[Iterator] = None
        self._uploader: Optional[Uploader] = None

    def __len__(self) -> int:
        return self.steps

    def on(self, device: torch.device) -> "EpochLoader":
        """The micro-batches arrive on `device` (before the first iteration)."""
        self.device = torch.device(device)
        return self

    def state_dict(self) -> dict:
        """The checkpoint's data field: where the stream is (a step), and what it is made of."""
        return {"data": {**self.stream, "step": self.position}}

    def load_state_dict(self, state: dict) -> None:
        """The stream was made at the checkpoint's step (train_loader's `step`); a warning when it is not
        the stream the run had (another shard set, another seed, another kind): the run goes on, on
        the data it has now."""
        saved = state.get("data") or {}
        changed = [f"{k} {saved[k]} -> {v}" for k, v in self.stream.items() if k in saved and saved[k] != v]
        if changed:
            warn(f"the training stream is not the one the run stopped in ({'; '.join(changed)}): "
                 "it goes on from its step on the data there is now")

    def take_traced(self) -> list[np.ndarray]:
        """The (lane, image, patch) numbers of the micro-batches given out since the last call."""
        traced, self.traced = self.traced, []
        return traced

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self._items is None:
            with stop_signals_held():  # (its workers start here)
                self._items = iter(self.loader)
        batches = self._counted(self.loader.dataset.micro_batches(self._items, self.steps, self.grad_accum))
        if self.device.type != "cuda":
            for pairs, qualities, _ in batches:
                yield to_tensors(pairs[0], pairs[1], qualities)
            return
        if self._uploader is None:
            self._uploader = Uploader(self.device)
        yield from self._uploader.run(batches)

    def _counted(self, batches: Iterator[tuple]) -> Iterator[tuple]:
        for n, (pairs, qualities, ids) in enumerate(batches, 1):
            if self.trace and ids is not None:
                self.traced.append(ids)
            if n % self.grad_accum == 0:  # (counted before it is given: the step that takes it is then done)
                self.position += 1
            yield pairs, qualities, ids


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

    def _upload(self, view: np.ndarray, qualities: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.cuda.Event]:
        """`view`: (2, N, P, P, C) uint8, `qualities`: (N,) float32."""
        i = self.n % self.DEPTH
        self.n += 1
        if self.events[i] is not None:
            self.events[i].synchronize()  # its last upload has finished: the buffer is free (long since)
        if self.buffers[i] is None or self.buffers[i].shape != view.shape:
            self.buffers[i] = torch.empty(view.shape, dtype=torch.uint8, pin_memory=True)
            self.quality_buffers[i] = torch.empty(qualities.shape, dtype=torch.float32, pin_memory=True)
        pinned, pinned_q = self.buffers[i], self.quality_buffers[i]
        np.copyto(pinned.numpy(), view)
        np.copyto(pinned_q.numpy(), qualities)
        with torch.cuda.stream(self.stream):
            on_device = pinned.to(self.device, non_blocking=True).permute(0, 1, 4, 2, 3)  # 2 x N x C x P x P
            q_on_device = pinned_q.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[i] = event
        return on_device[0], on_device[1], q_on_device, event

    def run(self, batches: Iterator[tuple]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        ahead = None
        for pairs, qualities, _ in batches:
            nxt = self._upload(pairs, qualities)
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
                 grad_accum: int = 1, step: int = 0, steps: Optional[int] = None) -> EpochLoader:
    """Training batches for this rank, epoch after epoch: each `iter()` yields one epoch's steps, each of
    grad_accum micro-batches of (input, target) uint8 N x C x P x P and the inputs' N qualities
    (float32, from their JPEG's tables), and the next one goes on with the same stream.

    From a shard folder (data.shards) the stream is a function of integers (restorer.data.stream):
    started at `step`, it gives what an uninterrupted run gives from that step on, whatever the world
    size, the worker count and the split of the global batch into batch_size x grad_accum. From
    train_urls it is streamed (StreamPatches). `steps` (per epoch) defaults to `steps_per_epoch`; it
    is the same on every rank whatever the shards. The batches come on the CPU (`.on(device)` moves
    them); with data.trace the loader keeps the numbers of what it gave out (EpochLoader)."""
    workers = cfg.workers
    global_batch = batch_size * grad_accum * world_size
    if uses_lanes(cfg):
        manifest = load_manifest(cfg.shards)
        urls = split_urls(cfg, "train")
        counts = [sh["samples"] for sh in manifest["splits"]["train"]["shards"]]
        index = index_shards(urls, counts, warn=warn)
        plan = StreamPlan(seed=seed, images=len(index), lanes=global_batch, patches_per_image=cfg.patches_per_image,
                          window_images=max(1, cfg.shuffle_buffer // cfg.patches_per_image))
        lanes = rank_lanes(global_batch, rank, world_size)
        workers = min(workers, len(lanes))  # a worker without lanes would have nothing to make
        dataset = LanePatches(index, plan, cfg, lanes=lanes, step=step, workers=workers, rank=rank)
        stream = {"kind": "lanes", "images": len(index), "global_batch": global_batch, "seed": seed}
    else:
        urls = split_urls(cfg, "train")
        streams = world_size * max(workers, 1)
        if len(urls) < streams:
            warn(f"{len(urls)} training shard(s) for {streams} streams (ranks x data.workers): "
                 f"every stream reads every shard and keeps its share, so each shard is read {streams} times an "
                 f"epoch; give at least {streams} shards (make_shards.py --maxcount) or train from a shard folder "
                 "(data.shards)")
        dataset = StreamPatches(urls, cfg, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, step=step)
        stream = {"kind": "urls", "global_batch": global_batch, "seed": seed}
    loader = DataLoader(dataset, batch_size=None, collate_fn=_as_is, worker_init_fn=_worker_init(), num_workers=workers,
                        prefetch_factor=dataset.ring.prefetch if workers else None, persistent_workers=workers > 0,
                        multiprocessing_context=_mp_context(workers))
    if steps is None:
        steps = steps_per_epoch(cfg, batch_size, world_size, grad_accum)
    return EpochLoader(loader, steps, grad_accum, trace=cfg.trace, stream=stream, step=step)


def val_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1,
               pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]]:
    """This rank's share of the validation images at each validation quality: (input, target,
    quality, key), batch 1, deterministic."""
    dataset = ValPairs(split_urls(cfg, "val"), cfg, rank=rank, world_size=world_size)
    workers = min(cfg.workers, 2)
    loader = DataLoader(dataset, batch_size=None, collate_fn=_as_is, worker_init_fn=_worker_init(), num_workers=workers,
                        multiprocessing_context=_mp_context(workers))
    with stop_signals_held():  # (its workers start here)
        items = iter(loader)
    for inputs, targets, qualities, key in items:
        yield *to_tensors(inputs, targets, qualities, pin_memory), key
