"""The training stream as a function of integers: which image and which patch every lane of every
step holds comes from (seed, image epoch, image index, patch index) alone, whatever the world size
and the worker count, so a stopped run resumed is the run it continues, also on another number of
ranks.

    global batch G = world size x train.batch_size x train.grad_accum patches a step, kept for a run
    lane j (0 <= j < G)   gives slot j of every step's global batch: one patch a step
    step s                lane j's patch number s of its endless sequence

A lane's sequence is made of *image epochs*. Image epoch u orders every training image by a
permutation drawn from (seed, u); lane j takes the images at positions j, j + G, j + 2G, ... of it
(q = N // G each: the last N mod G positions wait for another order; with fewer images than lanes,
q = 1 and lanes share images), and each image gives `patches_per_image` (K) patches. The lane's
images come in *windows* of W images (W K patches, W = shuffle_buffer // K): a window's patches
come out in an order drawn from (seed, u, j, window), so consecutive steps mix W images. Lane j
starts its endless sequence at its own phase (j W K / G patches in), so the lanes change images at
different steps rather than all at once. Patch number k
of image i in epoch u is cut by a generator seeded with (seed, u, i, k): crop, rescale, rotation,
flips, channel order, JPEG quality, chroma and double-JPEG shift.

Where a run is, is one number: its step. A rank owns the lanes of its part of the global batch;
its DataLoader workers share them out. To start at step s, each lane works out which window holds
its position and decodes only the images whose patches are still to come: a resume costs what a
fresh start costs, wherever in the epoch it falls.

Images are read by random access: an index of the tar members (offset and size of each sample's
image, from the shards' own headers) says where each image's bytes lie, so each image's bytes are
read once an image epoch across the whole job, whatever the world size and worker count.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from restorer.data.decode import IMAGE_EXTENSIONS, ImageDecodeError, decode_image
from restorer.data.patches import training_pair

IMAGE_MEMBERS = tuple(sorted(ext[1:] for ext in IMAGE_EXTENSIONS))  # webdataset member names: no dot
# the draws of each kind of randomness get their own stream (the first entropy word)
_ORDER, _WINDOW, _PATCH = 1, 2, 3


class StreamError(ValueError):
    """A shard set or a global batch the stream cannot be made of; one line."""


# ----------------------------------------------------------------------------- where the images lie


@dataclass(frozen=True)
class SampleIndex:
    """Every training image's place: `shards[shard[i]]` holds image i's bytes at `offset[i]`,
    `size[i]` long; `keys[i]` names it. Images are numbered in shard order, then tar order."""

    shards: tuple[str, ...]
    shard: np.ndarray  # int32 (N,)
    offset: np.ndarray  # int64 (N,)
    size: np.ndarray  # int64 (N,)
    keys: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.keys)


def _key(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member as webdataset splits it: at the first dot of the basename."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_shards(paths: list[str], counts: list[int], warn: Callable[[str], None] = lambda text: None) -> SampleIndex:
    """The index of the image members of local tar shards, from their headers alone (the data is
    skipped by seeking). `counts` are the manifest's samples per shard: it numbers the images, so
    every rank numbers them alike whatever it finds on its disk. An image its shard does not hold
    (a shard cut short, or one that cannot be read) keeps its number and no place (offset -1): the
    lane that meets it takes the next image of the epoch's order instead, with a warning."""
    n = sum(counts)
    shard = np.repeat(np.arange(len(paths), dtype=np.int32), counts)
    offset, size = np.full(n, -1, np.int64), np.zeros(n, np.int64)
    keys = [""] * n
    start = 0
    for s, (path, count) in enumerate(zip(paths, counts)):
        found = 0
        try:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                seen = set()
                for member in tar:
                    key, ext = _key(member.name)
                    if not member.isfile() or ext not in IMAGE_MEMBERS or key in seen or found == count:
                        continue
                    seen.add(key)
                    offset[start + found], size[start + found], keys[start + found] = member.offset_data, member.size, key
                    found += 1
        except (OSError, tarfile.TarError) as e:
            warn(f"shard {path} cannot be read to its end ({type(e).__name__}: {e})")
        if found < count:
            warn(f"shard {path} holds {found} of its {count} images: the others are replaced by the next ones")
            for i in range(start + found, start + count):
                keys[i] = f"{Path(path).name}#{i - start}"
        start += count
    return SampleIndex(tuple(paths), shard, offset, size, tuple(keys))


class ImageReader:
    """Reads and decodes images by their index number: a seek and one read each, the shard files
    kept open. Counts the bytes read (bench/stream.py checks that an epoch reads each image once)."""

    def __init__(self, index: SampleIndex):
        self.index = index
        self.files: dict[int, object] = {}
        self.bytes_read = 0

    def read(self, i: int) -> bytes:
        s = int(self.index.shard[i])
        if self.index.offset[i] < 0:
            raise ImageDecodeError(f"not in its shard {self.index.shards[s]}")
        f = self.files.get(s)
        if f is None:
            f = self.files[s] = open(self.index.shards[s], "rb")
        f.seek(int(self.index.offset[i]))
        data = f.read(int(self.index.size[i]))
        self.bytes_read += len(data)
        if len(data) != self.index.size[i]:
            raise ImageDecodeError(f"cut short: {len(data)} of {self.index.size[i]} bytes")
        return data

    def decode(self, i: int) -> np.ndarray:
        return decode_image(self.read(i))

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


# ----------------------------------------------------------------------------- the plan: integers only


@dataclass(frozen=True)
class StreamPlan:
    """Which image and patch each lane gives at each step: pure functions of integers."""

    seed: int
    images: int  # N, the training images
    lanes: int  # G, the global batch
    patches_per_image: int  # K
    window_images: int  # W

    def __post_init__(self):
        if self.images < 1 or self.lanes < 1:
            raise StreamError(f"a stream needs images and lanes, got {self.images} image(s) and {self.lanes} lane(s)")

    @property
    def per_lane(self) -> int:
        """q: the images each lane takes from an image epoch."""
        return max(1, self.images // self.lanes)

    @property
    def steps_per_image_epoch(self) -> int:
        return self.per_lane * self.patches_per_image

    @property
    def window_patches(self) -> int:
        return min(self.window_images, self.per_lane) * self.patches_per_image

    def order(self, epoch: int) -> np.ndarray:
        """Image epoch `epoch`'s order of every training image."""
        return np.random.default_rng([_ORDER, self.seed, epoch]).permutation(self.images)

    def lane_images(self, order: np.ndarray, lane: int) -> np.ndarray:
        return order[(lane + self.lanes * np.arange(self.per_lane)) % self.images]

    def phase(self, lane: int) -> int:
        return lane * self.window_patches // self.lanes

    def window_order(self, epoch: int, lane: int, window: int, patches: int) -> np.ndarray:
        return np.random.default_rng([_WINDOW, self.seed, epoch, lane, window]).permutation(patches)

    def locate(self, step: int, lane: int) -> tuple[int, int, int]:
        """(image epoch, window, position in the window's order) of lane `lane` at step `step`."""
        epoch, t = divmod(step + self.phase(lane), self.steps_per_image_epoch)
        window, position = divmod(t, self.window_patches)
        return epoch, window, position

    def patch_rng(self, epoch: int, image: int, patch: int) -> np.random.Generator:
        return np.random.default_rng([_PATCH, self.seed, epoch, image, patch])


def rank_lanes(lanes: int, rank: int, world_size: int) -> range:
    """The lanes a rank owns: its contiguous part of the global batch (its micro-batches in order)."""
    share = lanes // world_size
    return range(rank * share, (rank + 1) * share)


def worker_lanes(lanes: range, worker: int, workers: int) -> range:
    """A DataLoader worker's share of its rank's lanes: every workers-th one, so each worker's lanes
    change images at steps spread evenly (the slots' phases), and no worker decodes while another idles."""
    return lanes[worker::workers]


# ----------------------------------------------------------------------------- one lane


class Lane:
    """One lane's patches from step `step` on: (pair, image, patch) where pair is training_pair's
    (JPEG bytes, clean target). The images of the current window are decoded when their first patch
    still to come is made, and dropped when the window ends."""

    def __init__(self, plan: StreamPlan, lane: int, step: int, reader: ImageReader, make_pair, skip):
        self.plan, self.lane, self.step = plan, lane, step
        self.reader, self.make_pair, self.skip = reader, make_pair, skip
        self._at: Optional[tuple[int, int]] = None  # (image epoch, window) of what is cached
        self._images: np.ndarray = np.empty(0, np.int64)
        self._order: np.ndarray = np.empty(0, np.int64)
        self._decoded: dict[int, np.ndarray] = {}
        self._epoch_order: Optional[tuple[int, np.ndarray]] = None

    def _window(self, epoch: int, window: int) -> None:
        plan = self.plan
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, plan.lane_images(plan.order(epoch), self.lane))
        w = plan.window_patches // plan.patches_per_image
        self._images = self._epoch_order[1][window * w:(window + 1) * w]
        self._order = plan.window_order(epoch, self.lane, window, len(self._images) * plan.patches_per_image)
        self._decoded.clear()
        self._at = (epoch, window)

    def _image(self, epoch: int, image: int) -> np.ndarray:
        decoded = self._decoded.get(image)
        if decoded is None:
            decoded = self._decoded[image] = self._decode(epoch, image)
        return decoded

    def _decode(self, epoch: int, image: int) -> np.ndarray:
        """The image, or when it cannot be read the next one in the epoch's order that can (the same
        one on every run over the same files: the stream stays a function of integers and the disk)."""
        full = None
        for n in range(self.plan.images):
            if n == 1:  # (only after a failure)
                full = self.plan.order(epoch)
                start = int(np.flatnonzero(full == image)[0])
            candidate = image if n == 0 else int(full[(start + n) % self.plan.images])
            try:
                return self.reader.decode(candidate)
            except (ImageDecodeError, OSError) as e:
                self.skip(f"image {self.reader.index.keys[candidate]}", str(e))
        raise NoImage(f"no usable training image in any of the {len(self.reader.index.shards)} shards")

    def next(self) -> tuple[tuple[bytes, np.ndarray], int, int]:
        plan = self.plan
        epoch, window, position = plan.locate(self.step, self.lane)
        if self._at != (epoch, window):
            self._window(epoch, window)
        slot, patch = divmod(int(self._order[position]), plan.patches_per_image)
        image = int(self._images[slot])
        pair = self.make_pair(self._image(epoch, image), plan.patch_rng(epoch, image, patch))
        self.step += 1
        return pair, image, patch


class NoImage(RuntimeError):
    """Not one training image of the index can be decoded."""


AHEAD = 8  # steps a lane makes in a row: its patches come from one image, whose pixels stay in the CPU's caches


def lane_patches(plan: StreamPlan, lanes: range, step: int, reader: ImageReader, patch_spec, jpeg_spec,
                 skip) -> Iterator[tuple[list[tuple[bytes, np.ndarray]], np.ndarray]]:
    """Step after step from `step`: the lanes' pairs (in lane order) and their (lane, image, patch)
    numbers (int64, len(lanes) x 3). Made AHEAD steps at a time, lane by lane (what comes out is the
    same, in the same order: each lane's patches are a function of its step alone)."""
    make = lambda image, rng: training_pair(image, patch_spec, jpeg_spec, rng)  # noqa: E731
    live = [Lane(plan, j, step, reader, make, skip) for j in lanes]
    while True:
        made = [[lane.next() for _ in range(AHEAD)] for lane in live]  # [lane][step]
        for k in range(AHEAD):
            ids = np.array([(lane.lane, *made[n][k][1:]) for n, lane in enumerate(live)], np.int64).reshape(-1, 3)
            yield [made[n][k][0] for n in range(len(live))], ids
