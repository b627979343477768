"""Pack a folder of photos into WebDataset tar shards: the logic of `python shard_tools/make_shards.py`
(its command line: restorer.tools.make_shards; the manifest: restorer.data.manifest).

Phases, each with a progress bar:
  1. find   walk the sources (folders, image files, text files listing paths)
  2. check  decode every image fully in worker processes; reject what is not a regular file
            (a FIFO, a device: never opened) and broken, fake, tiny, too large (never read) or
            bomb-sized files with a one-line reason; results are cached in DIR/.make_shards/
            so a re-run does not decode again
  3. plan   drop byte-identical duplicates, shuffle with --seed, split off validation,
            optionally cut tiles, name every sample
  4. write  shards in worker processes (their boundaries are planned from the file sizes),
            each under a temporary name, flushed and renamed when complete; recorded per
            shard, so a killed run writes only what is missing and yields the same bytes as
            an uninterrupted one
  5. manifest.json, written last and atomically: it only ever names complete shards.

Samples keep the ORIGINAL file bytes (a re-encoded JPEG would be a worse training label) under
the canonical extension of the real format, plus a `json` member with the source path, size,
mode and sha256. Keys contain no dots: webdataset splits a member name at its first dot.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import stat
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional

from tqdm import tqdm

from restorer.data.decode import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    canonical_extension,
    load_image,
    oriented_size,
    to_rgb_array,
)
from restorer.data.manifest import (
    MANIFEST_NAME,
    SPLITS,
    ManifestError,
    build_manifest,
    load_manifest,
    read_json_file,
    shard_name,
    write_manifest,
)
from restorer.base.errors import RunError, UsageError
from restorer.base.fileio import atomic_open, atomic_write_json, commit, temp_path

STATE_DIR = ".make_shards"
TAR_MTIME = 946684800  # fixed member time (2000-01-01): identical inputs give identical tars
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to a multiple of this
PROG = "restorer make-shards"  # (also python shard_tools/make_shards.py)
DEFAULT_MAX_BYTES = 512 * 1024**2  # an uncompressed 8-bit RGBA image of --max-pixels' default fits (458 MiB)
MAX_LIST_LINE = 64 * 1024  # bytes of one line of a list of paths: far longer than any path


# ----------------------------------------------------------------------------- what decides the output


@dataclass(frozen=True)
class PackOptions:
    """Everything that decides the output. Two runs with equal options and inputs give equal shards."""

    sources: tuple[str, ...]
    val_fraction: float = 0.01
    val_count: Optional[int] = None
    maxcount: int = 1000
    maxsize: int = 256 * 1024**2
    min_side: int = 128
    seed: int = 0
    tile: Optional[int] = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES

    def recorded(self) -> dict:
        return asdict(self) | {"sources": list(self.sources)}


# ----------------------------------------------------------------------------- 1. find


@dataclass(frozen=True)
class SourceFile:
    path: str  # absolute, used to read
    rel: str  # as shown to the user and stored in the sample's json


def find_images(sources: Iterable[str]) -> tuple[list[SourceFile], list[dict]]:
    """All image files under the sources (by extension, any case), and the paths that could not be read.

    A folder contributes `<folder name>/<path inside it>`; a list file's entries are resolved
    against the list's own folder and shown as written. A file reached twice is kept once.
    """
    found: dict[str, SourceFile] = {}
    problems: list[dict] = []

    def walk(root: str, shown: str) -> None:
        def onerror(err: OSError) -> None:
            problems.append({"path": _shown(root, shown, err.filename or root), "reason": f"unreadable folder: {err.strerror}"})

        for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
            dirnames.sort()
            # a symlink to a folder is not walked (it could loop); named like an image, the check says why
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            for name in sorted(filenames + links):
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    full = os.path.join(dirpath, name)
                    found.setdefault(full, SourceFile(full, _shown(root, shown, full)))

    def add(path: str, shown: str, listed: bool) -> None:
        if os.path.isdir(path):
            walk(path, shown)
        elif os.path.exists(path) and os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
            # an image by its name, whatever it is: the check reads it or rejects it with a reason
            found.setdefault(path, SourceFile(path, printable(shown)))
        elif not listed:
            read_list(path)
        elif not os.path.exists(path):
            problems.append({"path": printable(shown), "reason": "missing file (named in a list)"})
        # a listed file that is not an image is ignored, like one in a folder

    def read_list(list_path: str) -> None:
        not_a_list = f"{list_path} is neither an image (by extension) nor a text list of paths"
        lines = []
        try:
            with open_regular(list_path) as (f, _):
                while line := f.readline(MAX_LIST_LINE):  # by lines: a binary file fails at its first
                    if len(line) == MAX_LIST_LINE and not line.endswith(b"\n"):
                        raise UsageError(f"{not_a_list} (a line of {MAX_LIST_LINE:,} bytes)")
                    lines.append(line.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError:
            raise UsageError(not_a_list) from None
        except NotARegularFile as e:
            raise UsageError(f"{not_a_list}: it is {e}") from None
        except OSError as e:
            raise UsageError(f"cannot read {list_path}: {e.strerror}") from None
        base = os.path.dirname(list_path)
        for line in lines:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                add(os.path.normpath(os.path.join(base, entry)), os.path.normpath(entry), listed=True)

    for src in sources:
        add(src, os.path.basename(os.path.normpath(src)), listed=False)
    files = sorted(found.values(), key=lambda s: (s.rel, s.path))
    return files, problems


def _shown(root: str, shown: str, path: str) -> str:
    rel = os.path.relpath(path, root)
    return printable(shown if rel == "." else os.path.join(shown, rel))


def printable(path: str) -> str:
    """A file name as text that can be printed and stored as UTF-8: bytes that are not UTF-8 (Python
    keeps them as surrogates, os.fsdecode) become \\xNN escapes. The file is still opened by its real name."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# ----------------------------------------------------------------------------- 2. check


class NotARegularFile(Exception):
    """A path that is a FIFO, a device, a socket or a folder (after symlinks): its message says which."""


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


@contextlib.contextmanager
def open_regular(path: str) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """`path` open for reading, and its stat, if it is a regular file (a symlink to one is).

    Anything else raises NotARegularFile before it is opened: opening a FIFO waits for a writer, a
    device can be endless (/dev/zero). O_NONBLOCK and a second look at the open file keep one
    swapped in between from blocking or being read.
    """
    def refuse(st: os.stat_result) -> NotARegularFile:
        return NotARegularFile(next((kind for is_kind, kind in _FILE_KINDS if is_kind(st.st_mode)), "a special file"))

    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise refuse(st)
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise refuse(st)
        yield f, st


# reasons that depend on more than the file's size and mtime (its permissions, its kind): never cached
RECHECKED = ("unreadable", "not a regular file")


def check_image_file(path: str, min_side: int, max_pixels: int, max_bytes: int) -> dict:
    """Fully decode one file; runs in a worker process. Returns its record (ok or with a reason)."""
    record: dict = {"path": path}
    try:
        with open_regular(path) as (f, st):
            record.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
            if st.st_size > max_bytes:
                return record | {"reason": f"too large: {st.st_size:,} bytes (--max-bytes {max_bytes:,})"}
            data = f.read(st.st_size + 1)  # bounded: one byte more shows a file that grew
    except NotARegularFile as e:
        return record | {"reason": f"not a regular file: {e}"}
    except OSError as e:
        return record | {"reason": f"unreadable: {e.strerror}"}
    if len(data) != st.st_size:
        return record | {"reason": "unreadable: changed while it was read"}
    record["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        im = load_image(data, max_pixels=max_pixels)
        ext = canonical_extension(im.format)
        width, height = oriented_size(im)
        if im.mode not in ("RGB", "L"):
            to_rgb_array(im)  # the trainer converts these: prove it works now, not mid-training
    except ImageDecodeError as e:
        return record | {"reason": str(e)}
    if min(width, height) < min_side:
        return record | {"reason": f"too small: {width}x{height} (short side < {min_side})"}
    return record | {"ext": ext, "width": width, "height": height, "mode": im.mode}


def _check_star(task: tuple) -> dict:
    return check_image_file(*task)


class CheckCache:
    """Check results of earlier runs into the same DIR, keyed by (path, size, mtime).

    Appended line by line as results arrive, so a killed run keeps what it had checked. A file that
    could not be read is not cached: fixing its permissions changes neither its size nor its mtime.
    Paths are stored with JSON escapes (a file name need not be UTF-8). A line that is not a whole
    record (cut by a kill, or edited) is no record: its file is checked again.
    """

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        for rec in _json_lines(path):
            if _is_check_record(rec):
                self.records[rec["path"]] = rec

    def lookup(self, path: str) -> Optional[dict]:
        rec = self.records.get(path)
        if rec is None or rec.get("reason", "").startswith(RECHECKED):
            return None  # (an unreadable file is checked again: its permissions may have been fixed)
        try:
            st = os.stat(path)
        except OSError:
            return None
        return rec if (st.st_size, st.st_mtime_ns) == (rec["size"], rec["mtime_ns"]) else None

    @contextlib.contextmanager
    def appender(self) -> Iterator:
        with open(self.path, "a", encoding="utf-8") as f:
            def append(rec: dict) -> None:
                if not rec.get("reason", "").startswith(RECHECKED):
                    f.write(json.dumps(rec) + "\n")
            yield append


def _json_lines(path: Path) -> Iterator:
    """The JSON values of a file of one a line; lines that are not JSON (cut by a kill) are skipped."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError, RecursionError):
                yield json.loads(line)


def _is_check_record(rec) -> bool:
    """A check result as check_image_file writes it: with a reason, or with all a sample needs."""
    fields = {"path": str, "size": int, "mtime_ns": int}
    fields |= {"reason": str} if isinstance(rec, dict) and "reason" in rec else \
        {"sha256": str, "ext": str, "width": int, "height": int, "mode": str}
    return isinstance(rec, dict) and all(isinstance(rec.get(k), t) for k, t in fields.items())


def check_images(files: list[SourceFile], opts: PackOptions, workers: int, cache: CheckCache) -> list[dict]:
    """Check records for `files`, in the same order, reusing the cache where the file is unchanged."""
    records: dict[str, dict] = {}
    todo = []
    for sf in files:
        rec = cache.lookup(sf.path)
        if rec is not None:
            records[sf.path] = rec
        else:
            todo.append((sf.path, opts.min_side, opts.max_pixels, opts.max_bytes))
    bar = tqdm(total=len(files), initial=len(records), desc="check", unit="img", disable=None, dynamic_ncols=True)
    with bar, cache.appender() as append, _pool(workers) as pool:
        results = pool.imap_unordered(_check_star, todo, chunksize=4) if pool else map(_check_star, todo)
        for rec in results:
            records[rec["path"]] = rec
            append(rec)
            bar.update()
    return [records[sf.path] for sf in files]


@contextlib.contextmanager
def _pool(workers: int):
    """A process pool, or None for one worker (no process start-up, easier to profile)."""
    if workers <= 1:
        yield None
        return
    pool = multiprocessing.Pool(workers)
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


# ----------------------------------------------------------------------------- 3. plan


@dataclass(frozen=True)
class Sample:
    key: str
    path: str
    rel: str
    sha256: str
    ext: str
    width: int
    height: int
    mode: str
    size: int  # file size and time when checked: the file must still be the one that was checked
    mtime_ns: int
    tile: Optional[tuple[int, int, int, int]] = None  # x, y, width, height in the oriented image


@dataclass
class Plan:
    splits: dict[str, list[Sample]]
    shards: dict[str, list[tuple[str, int, int]]]  # per split: (shard name, first sample, end)
    images: dict[str, int]  # images (not tiles) per split
    rejected: list[dict]
    duplicates: list[dict]
    found: int

    def fingerprint(self) -> str:
        """Identifies the output: equal fingerprints, byte-identical shards."""
        h = hashlib.sha256()
        for split, samples in self.splits.items():
            h.update(f"{split} {self.shards[split]}\n".encode())
            for s in samples:
                h.update(f"{s.key} {s.sha256} {s.ext} {s.rel} {s.tile}\n".encode())
        return h.hexdigest()


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(rel: str, sha256: str, tile: Optional[tuple[int, int, int, int]] = None) -> str:
    """A readable, unique key without dots: `<file stem, sanitised>_<16 hex of sha256>[_y<Y>x<X>]`."""
    stem = os.path.basename(rel)
    stem = stem.rsplit(".", 1)[0] if "." in stem[1:] else stem
    stem = _KEY_UNSAFE.sub("_", stem).strip("_")[:40] or "img"
    key = f"{stem}_{sha256[:16]}"
    if tile is not None:
        key += f"_y{tile[1]:05d}x{tile[0]:05d}"
    return key


def tile_boxes(width: int, height: int, size: int) -> list[tuple[int, int, int, int]]:
    """SIZExSIZE boxes covering the image; the last row/column is aligned to the border (overlapping
    its neighbour) so no tile is smaller than SIZE unless the image itself is."""

    def starts(length: int) -> list[int]:
        if length <= size:
            return [0]
        s = list(range(0, length - size + 1, size))
        return s if s[-1] == length - size else s + [length - size]

    return [(x, y, min(size, width), min(size, height)) for y in starts(height) for x in starts(width)]


def make_plan(files: list[SourceFile], records: list[dict], problems: list[dict], opts: PackOptions) -> Plan:
    rejected = list(problems)
    duplicates = []
    kept: list[tuple[SourceFile, dict]] = []
    first_by_sha: dict[str, str] = {}
    for sf, rec in zip(files, records):  # files are sorted by rel: the first copy is kept
        if "reason" in rec:
            rejected.append({"path": sf.rel, "reason": rec["reason"]})
        elif rec["sha256"] in first_by_sha:
            duplicates.append({"path": sf.rel, "same_as": first_by_sha[rec["sha256"]]})
        else:
            first_by_sha[rec["sha256"]] = sf.rel
            kept.append((sf, rec))
    if not kept:
        raise UsageError(f"no usable images: all {len(files)} found were rejected or duplicates")

    random.Random(opts.seed).shuffle(kept)
    n = len(kept)
    if opts.val_count is not None:
        n_val = opts.val_count
    else:
        n_val = round(n * opts.val_fraction)
        if opts.val_fraction > 0 and n >= 2:
            n_val = max(1, n_val)
    if n_val >= n:
        raise UsageError(f"a validation set of {n_val} leaves no training images ({n} usable images)")

    splits: dict[str, list[Sample]] = {}
    images = {}
    for split, part in (("train", kept[n_val:]), ("val", kept[:n_val])):
        samples = []
        for sf, rec in part:
            boxes = tile_boxes(rec["width"], rec["height"], opts.tile) if opts.tile else [None]
            for box in boxes:
                samples.append(Sample(
                    key=sample_key(sf.rel, rec["sha256"], box), path=sf.path, rel=sf.rel,
                    sha256=rec["sha256"], ext=rec["ext"], width=rec["width"], height=rec["height"],
                    mode=rec["mode"], size=rec["size"], mtime_ns=rec["mtime_ns"], tile=box,
                ))
        splits[split] = samples
        images[split] = len(part)
    keys = [s.key for samples in splits.values() for s in samples]
    if len(set(keys)) != len(keys):  # 64 bits of sha256 per key: practically impossible
        raise RuntimeError("two samples got the same key; please report this")
    shards = {split: [(shard_name(split, i), a, b) for i, (a, b) in
                      enumerate(shard_ranges(samples, opts.maxcount, opts.maxsize))]
              for split, samples in splits.items()}
    return Plan(splits, shards, images, rejected, duplicates, found=len(files) + len(problems))


# ----------------------------------------------------------------------------- 4. write


class FileChangedError(RunError):
    """A source changed between its check and its packing: the plan no longer holds."""


def read_checked(s: Sample) -> bytes:
    """The source's bytes, if it is still the file that was checked (same size and modification time).

    Comparing the stat is what make and rsync do; hashing the bytes again would cost a third of
    all hashing for a case that a re-run handles anyway.
    """
    try:
        with open_regular(s.path) as (f, st):
            if (st.st_size, st.st_mtime_ns) == (s.size, s.mtime_ns):
                data = f.read(s.size + 1)
                if len(data) == s.size:
                    return data
    except (OSError, NotARegularFile):
        pass
    raise FileChangedError(f"{s.rel} changed or vanished since it was checked; run the same command again")


def _meta(s: Sample, tile_sha256: str = "") -> dict:
    if s.tile is None:
        return {"source": s.rel, "width": s.width, "height": s.height, "mode": s.mode, "sha256": s.sha256}
    x, y, w, h = s.tile
    return {"source": s.rel, "width": w, "height": h, "mode": "RGB", "sha256": tile_sha256,
            "tile": {"x": x, "y": y}, "source_width": s.width, "source_height": s.height,
            "source_mode": s.mode, "source_sha256": s.sha256}


def _json_bytes(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


def _png_bound(width: int, height: int) -> int:
    """Most bytes a PNG of an RGB tile can take: raw rows with their filter byte, zlib's worst-case
    growth, and chunk headers. A bound, because tile sizes must be known before they are encoded."""
    raw = height * (3 * width + 1)
    return raw + (raw >> 12) + (raw >> 14) + 64 + 12 * (raw // 8192 + 1) + 256


def _block(n: int) -> int:
    """Bytes a tar member of n bytes takes: its header plus the data padded to whole blocks."""
    return TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK


def _archive_size(content: int) -> int:
    """Final size of a tar whose members take `content` bytes: end marker, padded to a record."""
    return -(-(content + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def sample_tar_size(s: Sample) -> int:
    """Bytes the sample adds to a shard: exact for whole images, an upper bound for tiles."""
    if s.tile is None:
        return _block(s.size) + _block(len(_json_bytes(_meta(s))))
    return _block(_png_bound(s.tile[2], s.tile[3])) + _block(len(_json_bytes(_meta(s, "0" * 64))))


def shard_ranges(samples: list[Sample], maxcount: int, maxsize: int) -> list[tuple[int, int]]:
    """Cut a split into shards of at most maxcount samples and maxsize bytes ([first, end) each).

    Planned before writing, so shards can be written in parallel and a resumed run knows exactly
    which ones are missing. A single sample larger than maxsize gets a shard of its own.
    """
    ranges, first, content = [], 0, 0
    for i, s in enumerate(samples):
        size = sample_tar_size(s)
        if i > first and (i - first >= maxcount or _archive_size(content + size) > maxsize):
            ranges.append((first, i))
            first, content = i, 0
        content += size
    if samples:
        ranges.append((first, len(samples)))
    return ranges


def _members(samples: list[Sample]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every tar member of the samples, in order. An image cut into tiles is
    decoded once for all its tiles in this run of samples."""
    from PIL import Image

    pixels, pixels_of = None, None
    for s in samples:
        if s.tile is None:
            yield f"{s.key}.{s.ext}", read_checked(s)
            yield f"{s.key}.json", _json_bytes(_meta(s))
            continue
        if pixels_of != s.sha256:
            pixels, pixels_of = to_rgb_array(load_image(read_checked(s), max_pixels=sys.maxsize)), s.sha256
        x, y, w, h = s.tile
        buf = io.BytesIO()
        # compress_level 1: lossless all the same, several times faster to write than the default
        Image.fromarray(pixels[y:y + h, x:x + w]).save(buf, format="PNG", compress_level=1)
        png = buf.getvalue()
        yield f"{s.key}.png", png
        yield f"{s.key}.json", _json_bytes(_meta(s, hashlib.sha256(png).hexdigest()))


def write_shard(out: str, name: str, samples: list[Sample]) -> dict:
    """Write one shard to its temporary name (runs in a worker process); the caller commits it.

    Members are written straight to the file, hashing and counting on the way: the same bytes
    tarfile writes (USTAR headers, 512-byte blocks, a padded end) without its 16 KiB copy loop.
    """
    tmp = temp_path(Path(out) / name)
    sha256, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            def put(b: bytes) -> None:
                nonlocal size
                f.write(b)
                sha256.update(b)
                size += len(b)

            for member, data in _members(samples):
                info = tarfile.TarInfo(member)
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
                put(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
                put(data)
                put(bytes(-len(data) % TAR_BLOCK))
            put(bytes(_archive_size(size) - size))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"name": name, "samples": len(samples), "bytes": size, "sha256": sha256.hexdigest(), "tmp": str(tmp)}


def _write_shard_star(task: tuple) -> dict:
    return write_shard(*task)


class Progress:
    """Shards committed so far, one fsynced json line each; valid for one plan fingerprint only.

    A shard counts as done if its line is here and its file has the recorded size: a file is
    only ever renamed to a shard's name once complete and flushed, so that is enough.
    """

    def __init__(self, state_dir: Path, fingerprint: str, out: Path):
        self.path = state_dir / "progress.jsonl"
        self.shards: dict[str, dict] = {}  # shard name -> record
        lines = list(_json_lines(self.path))
        if lines and isinstance(lines[0], dict) and lines[0].get("plan") == fingerprint:
            for rec in lines[1:]:
                if not _is_shard_record(rec):
                    continue  # not written by this tool: the shard is written again
                path = out / rec["name"]
                if path.is_file() and path.stat().st_size == rec["bytes"]:
                    self.shards[rec["name"]] = rec
        with atomic_open(self.path, "w") as f:
            f.write(json.dumps({"plan": fingerprint}) + "\n")
            for rec in self.shards.values():
                f.write(json.dumps(rec) + "\n")

    def add(self, rec: dict) -> None:
        self.shards[rec["name"]] = rec
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _is_shard_record(rec) -> bool:
    fields = {"name": str, "samples": int, "bytes": int, "sha256": str}
    return isinstance(rec, dict) and all(isinstance(rec.get(k), t) for k, t in fields.items()) \
        and bool(_SHARD_FILE.match(rec["name"]))


def write_shards(out: Path, todo: list[tuple[str, list[Sample]]], workers: int, progress: Progress) -> None:
    """Write the shards in `todo` in worker processes; commit each (fsync, rename, record) on a
    background thread, so the disk flush of one shard overlaps the writing of the next."""
    bar = tqdm(total=sum(len(s) for _, s in todo), desc="write", unit="sample", disable=None, dynamic_ncols=True)
    tasks = [(str(out), name, samples) for name, samples in todo]
    committer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
    commits: list[concurrent.futures.Future] = []

    def commit_shard(rec: dict) -> None:
        commit(rec.pop("tmp"), out / rec["name"])
        progress.add(rec)

    try:
        with bar, _pool(workers) as pool:
            results = pool.imap_unordered(_write_shard_star, tasks) if pool else map(_write_shard_star, tasks)
            for rec in results:
                commits.append(committer.submit(commit_shard, rec))
                bar.update(rec["samples"])
                if commits[0].done():
                    commits.pop(0).result()  # a failed commit stops the run now, not at the end
    finally:
        committer.shutdown(wait=True)  # what was written completely is kept, even on Ctrl-C
    for f in commits:
        f.result()


# ----------------------------------------------------------------------------- the run

_SHARD_FILE = re.compile(r"^(train|val)-\d{6}\.tar$")
_OUR_FILE = re.compile(r"^((train|val)-\d{6}\.tar|manifest\.json|\.((train|val)-\d{6}\.tar|manifest\.json)\.tmp\d+)$")


def _our_files(out: Path) -> list[Path]:
    """Files this tool writes into DIR: shards, the manifest, and temporaries of either."""
    return [p for p in out.iterdir() if _OUR_FILE.match(p.name)]


def lock_out_dir(out: Path):
    """Hold DIR for this run: a second make_shards on the same DIR would delete this one's temporary
    files as leftovers. The lock is the kernel's (flock): it goes with the process, even a killed one."""
    import fcntl

    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    f = open(out / STATE_DIR / "lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise UsageError(f"{out} is being written by another make_shards (pid {holder}); wait for it, or use "
                         "another --out") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def prepare_out_dir(out: Path, opts: PackOptions, force: bool) -> tuple[Path, Optional[dict]]:
    """Check DIR can take this run (or wipe it with --force); returns the state folder and the
    manifest of an earlier run. A manifest that cannot be read is refused, not replaced: nothing in
    DIR is deleted unless --force says so."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"the output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / STATE_DIR
    if force:
        for p in _our_files(out):
            p.unlink()
        for p in state_dir.iterdir() if state_dir.is_dir() else []:
            if p.name != "lock":  # ours, held
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    state_dir.mkdir(exist_ok=True)
    manifest = None
    if (out / MANIFEST_NAME).exists():
        manifest = load_manifest(out, remedy="use --force to start over")  # ManifestError: one line, exit 2
    recorded = None
    for source in (state_dir / "options.json", out / MANIFEST_NAME):
        if source.exists():
            try:
                recorded = manifest.get("args") if source.name == MANIFEST_NAME else read_json_file(source)
            except (OSError, ManifestError):
                recorded = None
            if not isinstance(recorded, dict):
                raise UsageError(f"{source} is unreadable; use --force to start over")
            recorded = PackOptions(sources=()).recorded() | recorded  # options added since: their defaults
            break
    if recorded is not None and recorded != opts.recorded():
        diff = sorted(k for k in set(recorded) | set(opts.recorded()) if recorded.get(k) != opts.recorded().get(k))
        raise UsageError(f"{out} holds shards made with other arguments ({', '.join(diff)} differ); "
                         "use --force to start over")
    if recorded is None and any(_SHARD_FILE.match(p.name) for p in out.iterdir()):
        raise UsageError(f"{out} holds shards this tool did not record; use --force to start over")
    atomic_write_json(state_dir / "options.json", opts.recorded())
    return state_dir, manifest


def run(opts: PackOptions, out: Path, workers: int, force: bool, log=print) -> dict:
    """Pack `opts.sources` into `out`. Returns the manifest."""
    t0 = time.perf_counter()
    files, problems = find_images(opts.sources)
    if not files:
        raise UsageError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {', '.join(opts.sources)}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"the output {out} exists and is not a folder")
    with lock_out_dir(out):
        return _run(opts, out, workers, force, log, files, problems, t0)


def _run(opts: PackOptions, out: Path, workers: int, force: bool, log, files, problems, t0) -> dict:
    state_dir, manifest = prepare_out_dir(out, opts, force)

    records = check_images(files, opts, workers, CheckCache(state_dir / "checks.jsonl"))
    t_check = time.perf_counter()
    plan = make_plan(files, records, problems, opts)
    fingerprint = plan.fingerprint()
    progress = Progress(state_dir, fingerprint, out)
    if manifest is not None:
        if manifest.get("plan") != fingerprint:
            log(f"{PROG}: the images changed since {out} was written: rewriting its shards")
            (out / MANIFEST_NAME).unlink()  # a manifest must never name a shard that is being rewritten
    elif progress.shards:
        log(f"{PROG}: resuming: {len(progress.shards)} shards already written")
    todo = [(name, plan.splits[split][first:end]) for split in SPLITS
            for name, first, end in plan.shards[split] if name not in progress.shards]
    write_shards(out, todo, workers, progress)
    t_write = time.perf_counter()

    # shards left over from an earlier plan with more of them, and temporaries of killed runs
    for p in _our_files(out):
        if p.name != MANIFEST_NAME and p.name not in progress.shards:
            p.unlink()

    manifest = build_manifest(opts.recorded(), fingerprint,
                              {split: [progress.shards[name] for name, _, _ in plan.shards[split]] for split in SPLITS},
                              plan.images, plan.found, plan.rejected, plan.duplicates)
    write_manifest(out, manifest)
    log(summary(manifest, t_check - t0, t_write - t_check))
    return manifest


def summary(m: dict, check_s: float, write_s: float) -> str:
    im = m["images"]
    lines = [f"kept {im['kept']} of {im['found']} images ({im['rejected']} rejected, {im['duplicates']} duplicates)"]
    for split, s in m["splits"].items():
        lines.append(f"  {split:5s} {s['samples']:7d} samples from {s['images']} images in "
                     f"{len(s['shards'])} shards, {s['bytes'] / 1e6:,.1f} MB")
    if m["rejected"]:
        reasons = collections.Counter(r["reason"].split(":")[0].split(" (")[0] for r in m["rejected"])
        lines.append("  rejected: " + ", ".join(f"{n} {r}" for r, n in reasons.most_common()))
        lines.append("  (every rejected file and its reason: 'rejected' in manifest.json)")
    total_bytes = sum(s["bytes"] for s in m["splits"].values())
    lines.append(f"  check {check_s:.1f} s ({im['found'] / max(check_s, 1e-9):.1f} images/s), "
                 f"write {write_s:.1f} s ({total_bytes / 1e6 / max(write_s, 1e-9):.1f} MB/s)")
    return "\n".join(lines)
