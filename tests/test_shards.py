"""The shard tool: key naming, tiles, planning, and whole runs of the real CLI on real files."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from helpers import cli_here, encode, make_shards_cmd, messy_photo_folder, photo_like, run_make_shards, write
from restorer.data import decode_image
from restorer.data.manifest import ManifestError, load_manifest, shard_paths
from restorer.data.sharding import (
    PackOptions,
    SourceFile,
    _archive_size,
    make_plan,
    sample_key,
    tile_boxes,
)
from restorer.tools.make_shards import main as make_shards_main

# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize("rel", [
    "photos/img.001.png", "a/b/photo.2023.01.01.jpeg", "ünïcødé фото.png", "...png", ".hidden.jpg",
    "name with spaces & symbols!.tif", "x" * 300 + ".jpg", "noext",
])
def test_sample_key_has_no_dots_and_is_safe(rel):
    sha = hashlib.sha256(rel.encode()).hexdigest()
    key = sample_key(rel, sha)
    assert "." not in key and "/" not in key and " " not in key
    assert key.isascii() and len(key) <= 40 + 1 + 16
    assert key.endswith("_" + sha[:16])


def test_sample_key_keeps_a_readable_stem_and_tile_position():
    sha = "ab" * 32
    assert sample_key("dir/img.001.png", sha) == f"img_001_{sha[:16]}"
    assert sample_key("dir/фото.png", sha) == f"img_{sha[:16]}"
    assert sample_key("dir/ünï.png", sha) == f"n_{sha[:16]}"
    assert sample_key("a.jpg", sha, (512, 1024, 512, 512)) == f"a_{sha[:16]}_y01024x00512"


def test_tile_boxes_cover_the_image_with_full_size_tiles():
    boxes = tile_boxes(1100, 700, 512)
    assert {(x, y) for x, y, _, _ in boxes} == {(0, 0), (512, 0), (588, 0), (0, 188), (512, 188), (588, 188)}
    assert all((w, h) == (512, 512) for _, _, w, h in boxes)
    covered = np.zeros((700, 1100), bool)
    for x, y, w, h in boxes:
        covered[y:y + h, x:x + w] = True
    assert covered.all()
    assert tile_boxes(1024, 300, 512) == [(0, 0, 512, 300), (512, 0, 512, 300)]  # short side kept whole
    assert tile_boxes(512, 512, 512) == [(0, 0, 512, 512)]


def test_archive_size_matches_tarfile():
    for sizes in ([10], [511, 513], [100_000, 7, 0], [512] * 40):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, n in enumerate(sizes):
                info = tarfile.TarInfo(f"k{i}.bin")
                info.size = n
                tar.addfile(info, io.BytesIO(b"x" * n))
        content = sum(512 + -(-n // 512) * 512 for n in sizes)
        assert _archive_size(content) == len(buf.getvalue())


def _records(n: int, reject_every: int = 0, dup_every: int = 0):
    files, records = [], []
    for i in range(n):
        files.append(SourceFile(f"/p/{i:04d}.jpg", f"p/{i:04d}.jpg"))
        sha = hashlib.sha256(str(i if not (dup_every and i % dup_every == 1) else i - 1).encode()).hexdigest()
        rec = {"path": f"/p/{i:04d}.jpg", "sha256": sha, "ext": "jpg", "width": 300, "height": 200, "mode": "RGB",
               "size": 1000, "mtime_ns": 0}
        if reject_every and i % reject_every == 0:
            rec = {"path": rec["path"], "sha256": sha, "reason": "too small: 10x10 (short side < 128)"}
        records.append(rec)
    return files, records


@pytest.mark.parametrize("n, kw, n_val", [
    (100, {"val_fraction": 0.1}, 10),
    (100, {"val_fraction": 0.0}, 0),
    (5, {"val_fraction": 0.01}, 1),  # at least one validation image
    (1, {"val_fraction": 0.01}, 0),  # ... unless that would leave no training image
    (100, {"val_count": 7}, 7),
])
def test_split_sizes(n, kw, n_val):
    files, records = _records(n)
    plan = make_plan(files, records, [], PackOptions(sources=("/p",), **kw))
    assert plan.images == {"train": n - n_val, "val": n_val}
    keys = [s.key for split in plan.splits.values() for s in split]
    assert len(set(keys)) == n  # disjoint and complete


def test_plan_is_seeded_and_counts_rejects_and_duplicates():
    files, records = _records(60, reject_every=10, dup_every=7)
    a = make_plan(files, records, [{"path": "x", "reason": "unreadable folder: Permission denied"}],
                  PackOptions(sources=("/p",), val_count=5, seed=1))
    b = make_plan(files, records, [], PackOptions(sources=("/p",), val_count=5, seed=1))
    c = make_plan(files, records, [], PackOptions(sources=("/p",), val_count=5, seed=2))
    assert [s.key for s in a.splits["train"]] == [s.key for s in b.splits["train"]]
    assert [s.key for s in a.splits["train"]] != [s.key for s in c.splits["train"]]
    assert len(a.rejected) == 6 + 1 and len(b.rejected) == 6
    # duplicates of rejected files are not counted twice: i % 7 == 1 copies i - 1
    n_dups = sum(1 for i in range(60) if i % 7 == 1 and i % 10 != 0 and (i - 1) % 10 != 0)
    assert len(a.duplicates) == n_dups
    assert sum(a.images.values()) == 60 - 6 - n_dups


def test_val_count_too_large_is_a_usage_error():
    from restorer.base.errors import UsageError

    files, records = _records(5)
    with pytest.raises(UsageError, match="leaves no training images"):
        make_plan(files, records, [], PackOptions(sources=("/p",), val_count=5))


# ----------------------------------------------------------------------------- whole runs


def _read_back(out: Path, split: str) -> list[dict]:
    """Every sample of a split as webdataset streams it."""
    ds = wds.WebDataset(shard_paths(out, split), shardshuffle=False, empty_check=False)
    return list(ds)


def _tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _files(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file: a file rewritten, even byte for byte, gets a new one."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.iterdir()) if p.is_file()}


def _checked(out: Path) -> list[str]:
    """The paths the shard tool's check cache holds, one a check (a line cut by a kill is no check)."""
    paths = []
    for line in (out / ".make_shards" / "checks.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            paths.append(json.loads(line)["path"])
        except json.JSONDecodeError:
            pass
    return paths


def test_messy_folder_is_packed_exactly(tmp_path):
    truth = messy_photo_folder(tmp_path / "photos")
    out = tmp_path / "shards"
    p = run_make_shards(tmp_path / "photos", "--out", out, "--val-count", "2", "--maxcount", "4", "--workers", "2")
    assert "kept 11 of 19 images (6 rejected, 2 duplicates)" in p.stdout

    m = json.loads((out / "manifest.json").read_text())
    assert m["images"] == {"found": 19, "kept": 11, "rejected": 6, "duplicates": 2}
    assert {d["path"] for d in m["duplicates"]} == truth["duplicates"]
    reasons = {r["path"]: r["reason"] for r in m["rejected"]}
    assert set(reasons) == set(truth["rejected"])
    for path, prefix in truth["rejected"].items():
        assert reasons[path].startswith(prefix), (path, reasons[path])
        assert "\n" not in reasons[path]
    assert m["splits"]["val"]["images"] == 2 and m["splits"]["train"]["images"] == 9
    assert [len(s["shards"]) for s in m["splits"].values()] == [3, 1]  # 9 train at 4 per shard

    seen = {}
    for split in ("train", "val"):
        split_bytes = 0
        for shard in m["splits"][split]["shards"]:
            data = (out / shard["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
            split_bytes += len(data)
        assert split_bytes == m["splits"][split]["bytes"]
        samples = _read_back(out, split)
        assert len(samples) == m["splits"][split]["samples"]
        for s in samples:
            meta = json.loads(s["json"])
            image_ext = [k for k in s if k not in ("__key__", "__url__", "__local_path__", "json")]
            assert len(image_ext) == 1 and "." not in s["__key__"]
            original = truth["good"][meta["source"]]
            assert s[image_ext[0]] == original  # the original bytes, never re-encoded
            assert meta["sha256"] == hashlib.sha256(original).hexdigest()
            assert (meta["height"], meta["width"]) == decode_image(original).shape[:2]
            seen[meta["source"]] = (split, image_ext[0], meta["mode"])
    assert set(seen) == set(truth["good"])
    photos = "photos"
    assert seen[f"{photos}/jpeg_named.png"][1] == "jpg"  # the real format's extension
    assert seen[f"{photos}/UPPER.JPG"][1] == "jpg" and seen[f"{photos}/sub/deeper/e.tif"][1] == "tif"
    assert seen[f"{photos}/gray.png"][2] == "L" and seen[f"{photos}/rgba.png"][2] == "RGBA"


def test_list_file_and_maxsize(tmp_path):
    src = tmp_path / "imgs"
    sizes = {}
    for i in range(12):
        data = encode(photo_like(160, 160, i), "PNG")
        sizes[f"p{i}.png"] = len(data)
        write(src / f"p{i}.png", data)
    listing = tmp_path / "list.txt"
    listing.write_text("# my selection\n" + "".join(f"imgs/p{i}.png\n" for i in range(10)) + "imgs/gone.png\n\n")
    limit = 3 * max(sizes.values()) + 8 * 1024
    out = tmp_path / "out"
    run_make_shards(listing, "--out", out, "--val-fraction", "0", "--maxsize", str(limit), "--maxcount", "100")
    m = load_manifest(out)
    assert m["images"]["kept"] == 10 and m["splits"]["val"]["shards"] == []
    assert m["rejected"] == [{"path": "imgs/gone.png", "reason": "missing file (named in a list)"}]
    shards = m["splits"]["train"]["shards"]
    assert len(shards) >= 4 and all(sh["bytes"] <= limit for sh in shards)
    sources = sorted(json.loads(s["json"])["source"] for s in _read_back(out, "train"))
    assert sources == sorted(f"imgs/p{i}.png" for i in range(10))


def test_tiles_are_lossless_crops_and_never_cross_splits(tmp_path):
    src = tmp_path / "big"
    arrays = {}
    for i in range(3):
        arrays[f"big/t{i}.png"] = photo_like(300 + 50 * i, 260, 20 + i)
        write(src / f"t{i}.png", encode(arrays[f"big/t{i}.png"], "PNG"))
    out = tmp_path / "out"
    run_make_shards(src, "--out", out, "--tile", "128", "--val-count", "1", "--maxcount", "5")
    m = load_manifest(out)
    by_source: dict[str, set] = {}
    for split in ("train", "val"):
        samples = _read_back(out, split)
        assert len(samples) == m["splits"][split]["samples"]
        for s in samples:
            meta = json.loads(s["json"])
            tile = decode_image(s["png"])
            x, y = meta["tile"]["x"], meta["tile"]["y"]
            assert tile.shape == (128, 128, 3)
            np.testing.assert_array_equal(tile, arrays[meta["source"]][y:y + 128, x:x + 128])
            assert meta["sha256"] == hashlib.sha256(s["png"]).hexdigest()
            by_source.setdefault(meta["source"], set()).add(split)
    assert all(len(splits) == 1 for splits in by_source.values())
    # 300x260 -> 3x3 tiles, 350x260 -> 3x3, 400x260 -> 4x3
    assert m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"] == 9 + 9 + 12


def test_rerun_is_idempotent_and_other_arguments_need_force(tmp_path):
    src = tmp_path / "p"
    for i in range(6):
        write(src / f"{i}.jpg", encode(photo_like(150, 150, i), "JPEG"))
    out = tmp_path / "out"
    run_make_shards(src, "--out", out, "--maxcount", "2")
    before, files, checked = _tree_bytes(out), _files(out), _checked(out)
    assert len(checked) == 6
    run_make_shards(src, "--out", out, "--maxcount", "2", "--workers", "1")  # workers do not change output
    assert _tree_bytes(out) == before
    assert _files(out) == files  # not one shard, nor the manifest, written again
    assert _checked(out) == checked  # not one image checked again

    p = run_make_shards(src, "--out", out, "--maxcount", "3", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "other arguments (maxcount differ); use --force" in p.stderr
    assert _tree_bytes(out) == before

    run_make_shards(src, "--out", out, "--maxcount", "3", "--force")
    m = load_manifest(out)
    assert [len(s["shards"]) for s in m["splits"].values()] == [2, 1]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tar") == [
        "train-000000.tar", "train-000001.tar", "val-000000.tar"]


def test_new_photos_rewrite_the_shards(tmp_path):
    src = tmp_path / "p"
    for i in range(6):
        write(src / f"{i}.jpg", encode(photo_like(150, 150, i), "JPEG"))
    out = tmp_path / "out"
    run_make_shards(src, "--out", out, "--maxcount", "1")
    (src / "0.jpg").unlink()
    p = run_make_shards(src, "--out", out, "--maxcount", "1")
    assert "rewriting" in p.stdout
    m = load_manifest(out)
    assert m["images"]["kept"] == 5
    # no shard is left over from the larger set
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(
        sh["name"] for s in m["splits"].values() for sh in s["shards"])


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nope", "--out", "{tmp}/o"], "source does not exist: {tmp}/nope"),
    (["{tmp}/empty", "--out", "{tmp}/o"], "no image files"),
    (["{tmp}/src", "--out", "{tmp}/src/a.png"], "exists and is not a folder"),
    (["{tmp}/src", "--out", "{tmp}/o", "--val-count", "5"], "leaves no training images"),
    (["{tmp}/src", "--out", "{tmp}/o", "--tile", "64"], "--tile 64 is smaller than --min-side 128"),
    (["{tmp}/src", "--out", "{tmp}/foreign"], "holds shards this tool did not record; use --force"),
    (["{tmp}/junk.bin", "--out", "{tmp}/o"], "neither an image (by extension) nor a text list"),
])
def test_user_mistakes_get_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    write(tmp_path / "src" / "a.png", encode(photo_like(150, 150, 0), "PNG"))
    write(tmp_path / "foreign" / "train-000000.tar", b"")
    write(tmp_path / "junk.bin", bytes(range(256)) * 4)
    p = run_make_shards(*[a.format(tmp=tmp_path) for a in args], check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("restorer make-shards: error: ") and p.stderr.count("\n") == 1
    assert message.format(tmp=tmp_path) in p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_load_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="no shard manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ManifestError, match="not a restorer shard manifest"):
        load_manifest(tmp_path)


# ----------------------------------------------------------------------------- kill and resume


def _kill_when(cmd: list[str], ready) -> None:
    """Start `cmd`, SIGKILL its whole process group as soon as `ready()` holds, and show it was mid-run."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while not ready():
            assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "never reached the kill point"
            time.sleep(0.001)  # polling for an observable file, not waiting for a guess
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
    src = tmp_path_factory.mktemp("many") / "src"
    for i in range(150):
        write(src / f"{i:03d}.png", encode(photo_like(40, 36, i), "PNG"))
    return src


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["check", "write"])
def test_killed_run_resumes_to_identical_shards(tmp_path, many_photos, phase):
    args = [many_photos, "--min-side", "16", "--maxcount", "1", "--val-count", "10", "--workers", "2"]
    reference = tmp_path / "reference"
    run_make_shards(*args, "--out", reference)

    out = tmp_path / "out"
    if phase == "check":
        checks = out / ".make_shards" / "checks.jsonl"
        ready = lambda: checks.exists() and checks.read_bytes().count(b"\n") >= 20  # noqa: E731
    else:
        progress = out / ".make_shards" / "progress.jsonl"  # 10 shards recorded as done, however busy the machine
        ready = lambda: progress.exists() and sum(  # noqa: E731
            b'"name"' in line and line.rstrip().endswith(b"}") for line in progress.read_bytes().splitlines()) >= 10
    _kill_when(make_shards_cmd(*args, "--out", out), ready)
    assert not (out / "manifest.json").exists()
    for p in out.glob("*.tar"):  # whatever the kill left, nothing under a shard's name is partial
        with tarfile.open(p) as tar:
            assert len(tar.getmembers()) == 2
    # the shards the killed run had recorded as done (one renamed but not yet recorded when the kill
    # came is written again, rightly: nothing says it is complete)
    progress = out / ".make_shards" / "progress.jsonl"
    recorded = {json.loads(line).get("name") for line in (progress.read_text().splitlines() if progress.exists() else [])
                if line.strip().endswith("}")}
    written = {name: id_ for name, id_ in _files(out).items() if name in recorded}
    checked = _checked(out)
    assert checked and len(set(checked)) == len(checked)

    p = run_make_shards(*args, "--out", out)
    if phase == "write":
        assert "resuming" in p.stdout and len(written) >= 10
    assert _tree_bytes(out) == _tree_bytes(reference)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    # what the killed run had done was not done again: its shards are the same files, and every
    # image was checked once in all (the rerun checked only those the kill had left)
    assert {name: _files(out)[name] for name in written} == written
    again = _checked(out)
    assert again[:len(checked)] == checked and len(again) == len(set(again)) == 150


# ----------------------------------------------------------------------------- names, stale rejects, two runs


def test_a_file_name_that_is_not_utf8_is_packed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        write(src / f"ok{i}.png", encode(photo_like(140, 130, 20 + i), "PNG"))
    raw = os.path.join(os.fsencode(src), b"caf\xe9 photo.png")  # Latin-1 bytes: not UTF-8
    with open(raw, "wb") as f:
        f.write(encode(photo_like(150, 140, 30), "PNG"))
    run_make_shards(src, "--out", tmp_path / "out", "--val-count", "1", "--min-side", "64")
    sources = []
    for tar in sorted((tmp_path / "out").glob("*.tar")):
        with tarfile.open(tar) as t:
            sources += [json.loads(t.extractfile(m).read())["source"] for m in t.getmembers() if m.name.endswith(".json")]
    assert "src/caf\\xe9 photo.png" in sources and len(sources) == 4


def test_a_file_once_unreadable_is_checked_again(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        write(src / f"p{i}.png", encode(photo_like(140, 130, 40 + i), "PNG"))
    fixed = src / "p0.png"
    st = fixed.stat()
    # what an earlier run left in its cache when it could not read the file (the same size and mtime:
    # a chmod changes neither)
    state = tmp_path / "out" / ".make_shards"
    state.mkdir(parents=True)
    (state / "checks.jsonl").write_text(json.dumps({"path": str(fixed), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                    "reason": "unreadable: Permission denied"}) + "\n")
    run_make_shards(src, "--out", tmp_path / "out", "--val-count", "1", "--min-side", "64")
    manifest = load_manifest(tmp_path / "out")
    assert manifest["images"]["kept"] == 3 and not manifest["rejected"]
    records = [json.loads(line) for line in (state / "checks.jsonl").read_text().splitlines()]
    assert "reason" not in [r for r in records if r["path"] == str(fixed)][-1]  # the new check, cached


def test_two_runs_on_one_folder_are_refused(tmp_path):
    import fcntl

    src = tmp_path / "src"
    for i in range(2):
        write(src / f"p{i}.png", encode(photo_like(140, 130, 50 + i), "PNG"))
    lock = tmp_path / "out" / ".make_shards" / "lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:  # another make_shards holding the folder (as its kernel lock)
        held.write("12345")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        p = run_make_shards(src, "--out", tmp_path / "out", "--val-count", "1", "--min-side", "64", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "is being written by another make_shards (pid 12345)" in p.stderr
    assert not list((tmp_path / "out").glob("*.tar"))
    run_make_shards(src, "--out", tmp_path / "out", "--val-count", "1", "--min-side", "64")  # free again: fine


# ----------------------------------------------------------------------------- hostile inputs


def _make_special_files(src: Path) -> dict[str, str]:
    """Files named like photos that are not photos to read: {shown path: reason the tool must give}."""
    import socket

    os.mkfifo(src / "fifo.jpg")  # an open() of it waits for a writer
    (src / "zero.jpg").symlink_to("/dev/zero")  # never ends
    (src / "loop.jpg").symlink_to("loop.jpg")
    (src / "album.jpg").symlink_to(src / "sub")  # a folder, not followed
    sock = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(src)  # a socket's path is limited to ~100 bytes: bind by its short relative name
    try:
        sock.bind("sock.png")
    finally:
        os.chdir(cwd)
        sock.close()  # the socket file stays
    write(src / "huge.png", encode(photo_like(400, 400, 99), "PNG"))  # over the --max-bytes below
    return {"src/fifo.jpg": "not a regular file: a FIFO", "src/zero.jpg": "not a regular file: a character device",
            "src/loop.jpg": "unreadable: Too many levels of symbolic links",
            "src/album.jpg": "not a regular file: a folder", "src/sock.png": "not a regular file: a socket",
            "src/huge.png": "too large: "}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_special_and_huge_files_are_rejected_with_a_reason(tmp_path, workers):
    src = tmp_path / "src"
    for i in range(3):
        write(src / "sub" / f"p{i}.jpg", encode(photo_like(140, 130, 60 + i), "JPEG"))
    expected = _make_special_files(src)
    assert (src / "huge.png").stat().st_size > 100_000
    listing = tmp_path / "list.txt"  # named in a list, they are rejected the same way
    listing.write_text("src/fifo.jpg\nsrc/zero.jpg\n")
    args = [src, listing, "--out", tmp_path / "out", "--val-count", "1", "--min-side", "64", "--max-bytes", "100K",
            "--workers", workers]
    # a process with a time limit: without the fix, this run hangs on the FIFO or fills the memory
    p = subprocess.run(make_shards_cmd(*args), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    m = load_manifest(tmp_path / "out")
    reasons = {r["path"]: r["reason"] for r in m["rejected"]}
    assert set(reasons) == set(expected)
    for path, reason in expected.items():
        assert reasons[path].startswith(reason), (path, reasons[path])
    assert m["images"]["kept"] == 3
    # a rerun checks the special files again (their kind is not in their size and mtime) and agrees
    again = subprocess.run(make_shards_cmd(*args), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and load_manifest(tmp_path / "out") == m


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_special_file_given_as_a_list_is_one_line(tmp_path, kind):
    source = tmp_path / "paths"
    os.mkfifo(source) if kind == "fifo" else source.symlink_to("/dev/zero")
    p = subprocess.run(make_shards_cmd(source, "--out", tmp_path / "out"), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    what = "a FIFO" if kind == "fifo" else "a character device"
    assert p.stderr == (f"restorer make-shards: error: {source} is neither an image (by extension) nor a text list of paths: "
                        f"it is {what}\n")


def test_a_source_swapped_for_a_fifo_after_its_check_is_not_waited_for(tmp_path):
    import threading

    from restorer.data.sharding import FileChangedError, Sample, read_checked

    path = tmp_path / "p.jpg"
    write(path, encode(photo_like(140, 130, 70), "JPEG"))
    st = path.stat()
    sample = Sample(key="p", path=str(path), rel="p.jpg", sha256="0" * 64, ext="jpg", width=140, height=130,
                    mode="RGB", size=st.st_size, mtime_ns=st.st_mtime_ns)
    path.unlink()
    os.mkfifo(path)
    outcome = []

    def read():
        try:
            read_checked(sample)
        except FileChangedError as e:
            outcome.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(20)  # a bound on a hang: the read itself takes microseconds
    blocked = reader.is_alive()
    if blocked:  # waiting in open() for a writer: one releases it, so the test ends
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
    assert not blocked, "the FIFO was opened and waited on"
    assert outcome == ["p.jpg changed or vanished since it was checked; run the same command again"]


@pytest.fixture
def packed(tmp_path):
    """A finished shard folder and the arguments that made it."""
    src = tmp_path / "src"
    for i in range(4):
        write(src / f"p{i}.jpg", encode(photo_like(140, 130, 80 + i), "JPEG"))
    args = [src, "--out", tmp_path / "out", "--val-count", "1", "--min-side", "64", "--maxcount", "2", "--workers", "1"]
    assert cli_here(make_shards_main, *args).returncode == 0
    return tmp_path / "out", args


def _damage(m: dict, how: str):
    shard = m["splits"]["train"]["shards"][0]
    if how == "a list":
        return [m]
    if how == "an entry of the wrong type":
        m["splits"]["train"]["shards"][0] = shard["name"]
    elif how == "a missing key":
        del shard["sha256"]
    elif how == "a name that is a number":
        shard["name"] = 123
    elif how == "a name outside the folder":
        shard["name"] = "../x.tar"
    return m


@pytest.mark.parametrize("how, problem", [
    ("truncated", "is not valid JSON"),
    ("a list", "is not a restorer shard manifest"),
    ("an entry of the wrong type", "has a shard without name, bytes or sha256 in splits.train.shards[0]"),
    ("a missing key", "has a shard without name, bytes or sha256 in splits.train.shards[0]"),
    ("a name that is a number", "has a name that is not a string in splits.train.shards[0]"),
    ("a name outside the folder", "names a shard outside its folder in splits.train.shards[0]: '../x.tar'"),
])
def test_a_rerun_over_a_damaged_manifest_refuses_in_one_line_and_deletes_nothing(packed, how, problem):
    out, args = packed
    manifest = out / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[:len(text) // 2] if how == "truncated" else json.dumps(_damage(json.loads(text), how)))
    before = _tree_bytes(out)
    p = cli_here(make_shards_main, *args)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"restorer make-shards: error: {manifest} {problem}")
    assert p.stderr.endswith("; use --force to start over\n")
    assert _tree_bytes(out) == before
    assert cli_here(make_shards_main, *args, "--force").returncode == 0  # the way out it names
    load_manifest(out)


def test_damaged_state_files_are_checked_again_or_refused(packed):
    out, args = packed
    before = _tree_bytes(out)
    state = out / ".make_shards"
    src = Path(args[0])
    st = (src / "p0.jpg").stat()
    # lines no run of the tool writes: each is no record, so its file is checked, its shard written again
    with open(state / "checks.jsonl", "a") as f:
        for rec in ([1], {"path": 5}, {"path": str(src / "p0.jpg"), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                        "sha256": "0" * 64}, {"path": str(src / "p1.jpg"), "reason": 7}):
            f.write(json.dumps(rec) + "\n")
    with open(state / "progress.jsonl", "a") as f:
        for rec in (["x"], {"name": "../../elsewhere.tar", "bytes": 0}, {"name": "train-000000.tar"}):
            f.write(json.dumps(rec) + "\n")
    p = cli_here(make_shards_main, *args)
    assert p.returncode == 0, p.stderr
    assert _tree_bytes(out) == before

    (state / "options.json").write_text("[1, 2]")
    p = cli_here(make_shards_main, *args)
    assert p.returncode == 2
    assert p.stderr == f"restorer make-shards: error: {state / 'options.json'} is unreadable; use --force to start over\n"


def test_a_folder_written_before_max_bytes_existed_is_taken_as_it_is(packed):
    out, args = packed
    before = _files(out)
    for path in (out / ".make_shards" / "options.json", out / "manifest.json"):
        recorded = json.loads(path.read_text())
        del (recorded["args"] if path.name == "manifest.json" else recorded)["max_bytes"]
        path.write_text(json.dumps(recorded))
    p = cli_here(make_shards_main, *args)
    assert p.returncode == 0, p.stderr
    assert {name: ids for name, ids in _files(out).items() if name.endswith(".tar")} == \
        {name: ids for name, ids in before.items() if name.endswith(".tar")}  # not one shard written again
