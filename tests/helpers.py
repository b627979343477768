"""Small real images for tests: textured so JPEG and PNG sizes are realistic, generated on the fly."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from restorer.infer.field_table import DEFAULT_BENCHMARKS

REPO = Path(__file__).resolve().parent.parent


def require(module: str, extra: str):
    """`module`, imported; a test without it is skipped on a developer's machine, but fails under CI
    (CI=1, .ci/run): there `make install` installs every extra, and a broken one must not hide a file."""
    import importlib

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run these tests: {module} (the {extra} extra) does not import: {e}", pytrace=False)
        pytest.skip(f"{module} is not installed (the {extra} extra)", allow_module_level=True)


BENCHMARKS = DEFAULT_BENCHMARKS  # the field's sets, beside the repository as in CI
BENCHMARK_SETS = {"LIVE1_color": "bmp", "LIVE1_gray": "png", "Classic5": "bmp"}  # set -> its files' format


def require_benchmarks() -> None:
    """The field's sets are beside the repository: else the test is skipped, or fails under CI."""
    import pytest

    if not all((BENCHMARKS / s).is_dir() for s in BENCHMARK_SETS):
        if os.environ.get("CI"):
            pytest.fail(f"CI must run these tests: the benchmarks are not at {BENCHMARKS}", pytrace=False)
        pytest.skip(f"the benchmarks are not at {BENCHMARKS}")


def small_benchmarks(root: Path, images: int = 2, side: int = 96) -> Path:
    """`images` images of each of the field's sets, side x side centre crops in their own formats and
    modes, under root (made); and Real/ (no originals). require_benchmarks first."""
    require_benchmarks()
    for name, ext in BENCHMARK_SETS.items():
        (root / name).mkdir(parents=True)
        for path in sorted((BENCHMARKS / name).glob(f"*.{ext}"))[:images]:
            im = Image.open(path)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im.crop((left, top, left + side, top + side)).save(root / name / path.name)
    (root / "Real").mkdir()
    (root / "Real" / "1.jpg").write_bytes((BENCHMARKS / "Real" / "1.jpg").read_bytes())
    return root


def photo_like(width: int, height: int, seed: int, channels: int = 3) -> np.ndarray:
    """Smooth gradients plus some noise: compresses like a photo, not like flat colour or pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((height, width, channels), np.float32)
    for c in range(channels):
        fx, fy, ph = rng.uniform(0.01, 0.08, 2).tolist() + [rng.uniform(0, 6.28)]
        out[..., c] = 128 + 80 * np.sin(xx * fx + ph) * np.cos(yy * fy) + rng.normal(0, 12, (height, width))
    return np.clip(out, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr.squeeze() if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_shards_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "shard_tools" / "make_shards.py"), *map(str, args)]


def run_make_shards(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    p = subprocess.run(make_shards_cmd(*args), capture_output=True, text=True, env=env, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"make_shards failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def messy_photo_folder(root: Path) -> dict:
    """A folder like a real one: formats, case, unicode and dotted names, broken files, duplicates.

    Returns {"good": {relative path: bytes}, "rejected": {relative path: reason prefix},
    "duplicates": set of relative paths dropped as copies}. Paths are relative to root's parent,
    the way the shard tool shows them.
    """
    name = root.name
    good: dict[str, bytes] = {}
    rejected: dict[str, str] = {}
    duplicates: set[str] = set()

    def put(rel: str, data: bytes) -> bytes:
        write(root / rel, data)
        return data

    good[f"{name}/a.jpg"] = put("a.jpg", encode(photo_like(200, 160, 1), "JPEG", quality=95))
    good[f"{name}/b.png"] = put("b.png", encode(photo_like(160, 180, 2), "PNG"))
    good[f"{name}/sub/c.webp"] = put("sub/c.webp", encode(photo_like(180, 150, 3), "WEBP", quality=90))
    good[f"{name}/sub/d.bmp"] = put("sub/d.bmp", encode(photo_like(150, 150, 4), "BMP"))
    good[f"{name}/sub/deeper/e.tif"] = put("sub/deeper/e.tif", encode(photo_like(140, 160, 5), "TIFF"))
    good[f"{name}/UPPER.JPG"] = put("UPPER.JPG", encode(photo_like(170, 130, 6), "JPEG", quality=90))
    good[f"{name}/photo.2023.01.01.jpeg"] = put("photo.2023.01.01.jpeg", encode(photo_like(160, 140, 7), "JPEG"))
    good[f"{name}/ünïcødé фото.png"] = put("ünïcødé фото.png", encode(photo_like(150, 170, 8), "PNG"))
    good[f"{name}/gray.png"] = put("gray.png", encode(photo_like(160, 160, 9, channels=1), "PNG"))
    good[f"{name}/jpeg_named.png"] = put("jpeg_named.png", encode(photo_like(130, 130, 10), "JPEG"))
    good[f"{name}/rgba.png"] = put("rgba.png", encode(photo_like(150, 130, 11, channels=4), "PNG"))

    full = encode(photo_like(300, 240, 12), "JPEG", quality=95)
    rejected[f"{name}/truncated.jpg"] = "truncated or corrupt"
    put("truncated.jpg", full[: len(full) // 2])
    png = bytearray(encode(photo_like(200, 200, 13), "PNG"))
    idat = png.index(b"IDAT")
    for i in range(idat + 200, idat + 260):
        png[i] ^= 0x5A
    rejected[f"{name}/damaged.png"] = "truncated or corrupt"
    put("damaged.png", bytes(png))
    rejected[f"{name}/empty.jpg"] = "empty file"
    put("empty.jpg", b"")
    rejected[f"{name}/fake.jpg"] = "not an image"
    put("fake.jpg", b"this is a text file pretending to be a photo\n" * 10)
    rejected[f"{name}/tiny.png"] = "too small"
    put("tiny.png", encode(photo_like(100, 300, 14), "PNG"))
    rejected[f"{name}/anim.gif.png"] = "unsupported format"
    put("anim.gif.png", encode(photo_like(150, 150, 15), "GIF"))

    put("copy_of_a.jpg", good[f"{name}/a.jpg"])
    duplicates.add(f"{name}/copy_of_a.jpg")
    put("sub/b_again.png", good[f"{name}/b.png"])
    duplicates.add(f"{name}/sub/b_again.png")

    put("notes.txt", b"not an image, ignored")
    put("sub/.hidden_dir/readme.md", b"ignored")
    return {"good": good, "rejected": rejected, "duplicates": duplicates}


# ----------------------------------------------------------------------------- the trainer, for real

# tiny and fast: patch 32, batch 2, one DataLoader worker per rank
TINY = ["data.patch.size=32", "data.patches_per_image=8", "data.shuffle_buffer=16", "data.workers=1",
        "data.val_crop=64", "data.val_qualities=[10,50]", "train.batch_size=2", "log.every=2", "log.progress=false",
        "log.tensorboard=false"]
INJECT = REPO / "tests" / "inject"  # sitecustomize.py: faults injected into real processes


def pack_photos(root: Path, n_images: int, maxcount: int, val: int = 2, size: tuple[int, int] = (120, 100)) -> Path:
    """root/src of n JPEG photos packed into root/shards (val of them for validation)."""
    from restorer.data.sharding import PackOptions, run

    for i in range(n_images):
        write(root / "src" / f"p{i:02d}.jpg", encode(photo_like(*size, 100 + i), "JPEG", quality=95))
    run(PackOptions(sources=(str(root / "src"),), val_count=val, maxcount=maxcount, min_side=64),
        root / "shards", workers=1, force=True, log=lambda *a: None)
    return root / "shards"


def train_cmd(nproc: int, shards: Path, out: Path, *overrides: str, torchrun_args: tuple = ()) -> list[str]:
    """launch/train.py on configs/cpu.yaml with TINY: plain python (nproc 0) or torchrun."""
    launch = [str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "cpu.yaml"),
              f"data.shards={shards}", f"train.out_dir={out}", *TINY, *overrides]
    if nproc == 0:
        return [sys.executable, *launch]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--standalone", *torchrun_args, *launch]


def train_env(fault: dict | None = None) -> dict:
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if fault is not None:
        env |= {"RESTORER_TEST_FAULT": json.dumps(fault),
                "PYTHONPATH": os.pathsep.join([str(INJECT), env.get("PYTHONPATH", "")])}
    return env


def cli_here(main, *args) -> subprocess.CompletedProcess:
    """A tool's command line (its `main`) run in this process, without the seconds a new process spends
    importing torch: its exit code and what it printed, as subprocess.run would give them."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(list(args), code, stdout.getvalue(), stderr.getvalue())


def train_here(shards: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """train_cmd(0, ...)'s run in this process (cli_here: launch/train.py's own main; a new process would
    also import torch._dynamo, most of a small run's time). For one-process runs that succeed and whose
    process is not what is tested: its signals, its exit status on a failure, faults injected into it
    and its loader workers' output need run_cmd."""
    from restorer.train.loop import main

    return cli_here(main, *train_cmd(0, shards, out, *overrides)[2:])  # (less python and launch/train.py)


def run_cmd(cmd: list[str], timeout: float = 240, fault: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=train_env(fault))


def logged_step(out: Path) -> int:
    """The last step the run in `out` logged (0 before its first line): what a test waits on."""
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        lines = train_lines(out)
        return lines[-1]["step"] if lines else 0
    return 0


def wait_for(cond, proc: subprocess.Popen, what: str, limit: float = 120, log: Path | None = None) -> None:
    """Poll `cond()` until it holds (an observable file or line: an event, not a duration); fail if
    `proc` ends first (with its stderr, or the end of `log` where its output goes to that file) or after
    `limit` seconds (a wait that would hang)."""
    deadline = time.monotonic() + limit
    while not cond():
        if proc.poll() is not None:
            said = log.read_text() if log is not None else proc.communicate()[1]
            raise AssertionError(f"ended before {what}: {said[-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc."""
    return [c for c, p in _parents().items() if p == pid]


def descendants(pid: int) -> list[int]:
    """Every process under `pid`: its children, theirs, and so on."""
    parents = _parents()
    found, frontier = [], {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier}
        found += frontier
    return found


def _parents() -> dict[int, int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    return parents


def assert_ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_lines(out: Path) -> list[dict]:
    return [m for m in metrics(out) if "loss" in m]


def events(out: Path) -> list[str]:
    return [m["event"] for m in metrics(out) if "event" in m]


# ----------------------------------------------------------------------------- checkpoints


def load_state(path: Path) -> dict:
    """A checkpoint file as the contract says anyone can read it: a dict, torch.load(weights_only=True)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def save_state(path: Path, state: dict) -> Path:
    """A raw dict as a checkpoint file (an older format's, or a damaged one)."""
    import torch

    torch.save(state, path)
    return path


def save_network(path: Path, model, name: str, options: dict, *, channels: int = 3, grayscale: bool = False,
                 ema: dict | None = None, config: dict | None = None, step: int = 0, best_psnr: float = float("-inf")) -> Path:
    """A checkpoint of `model` (built as build_model(name, in_channels=channels, **options)), as the trainer writes one."""
    from restorer.formats.checkpoint import Checkpoint, save_checkpoint
    from restorer.models import NetworkSpec

    save_checkpoint(path, Checkpoint(NetworkSpec(name, dict(options), channels, grayscale), model.state_dict(), ema=ema,
                                     config=config or {}, step=step, best_psnr=best_psnr))
    return path
