"""The GPU checks in one command, for a machine lent with a CUDA GPU for minutes:

    python bench/gpu_check.py [--seconds 45] [--work gpu-check] [--max-minutes 9]
    python bench/gpu_check.py --device cpu        a dry run on the CPU (below)

Needs an NVIDIA GPU, a CUDA build of torch >= 2.6 (PyPI's Linux wheel is one), and webdataset,
pillow, numpy, pyyaml, tqdm; no `make install`: it runs from the checkout. The first line says
which packages are missing and the pip command that adds them (a required one missing: exit 2).
scikit-image, when present, gives real photos to the loader (synthetic ones otherwise);
onnx, onnxruntime, safetensors, matplotlib are not needed here. No CUDA: one line, exit 2.

The stages, in this order (times with the defaults on one GPU; not yet measured on one). Every row
is printed the moment it is measured; a stage that fails says why in its row and the next starts.
  1 shards     64 2K photos packed into shards (reused by a rerun)                   ~20 s
  2 /dev/shm   the loader's batch rings must fit there (a container's 64 MB does not):
               if not, the row says so and the loader and trainer get the workers that fit
  3 loader     gpu.yaml's training loader alone, batches uploaded to the GPU         --seconds + ~15 s
  4 trainer    launch/train.py --config configs/gpu.yaml on one GPU, as it says (bf16). Its first
               50 steps and 10 s (a compile if the config asks, the loader's warm-up) are not timed; then --seconds
               of its own metrics.jsonl patches/s, and a SIGTERM (it saves). Is the GPU fed?
                                                         --seconds + 1-4 min (with train.compile: 1-3 more)
  5 train step bench/train_step.py at the trainer's batch: fp32 eager, bf16 + channels_last, and
               compiled (the trainer's inductor cache makes this compile short)      1-2 min
  6 torchrun   2 processes on nccl, 30 steps, when there are two GPUs (else skipped) ~1 min
  7 restore    a 6000 x 4000 photo with the trained network: seconds, peak memory    ~30 s
Total: about 5-7 min at the default --seconds 45; each second more of --seconds adds two.
--max-minutes (default 9) is a hard cap: each stage's time limit is cut to what is left, and a
stage it leaves no time for is skipped, in its row.

Everything stays in --work (default ./gpu-check, created, never deleted): shards/, photos/,
trainer.log and run/ (metrics.jsonl, last.pt), train_step.log, ddp.log and ddp/, the inductor
cache (a rerun compiles faster), and summary.json (rows and figures so far, rewritten after every
row). The last line printed is one JSON object of the figures. Exit 0: every stage ran; 1: a
stage failed or was skipped (torchrun on one GPU aside); 2: no CUDA, or a required package missing.

--device cpu is a dry run of the same stages on the CPU at tiny sizes (unet cpu preset, batches of
4 x 32 px, 8 small photos, 1 loader worker, --seconds 5, torchrun on gloo): it proves the flow,
the rows, the failure handling and the JSON in 1-2 minutes on 2 cores; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from restorer.formats.run_folder import LAST, METRICS  # noqa: E402 (it imports no third-party package)

PROG = "gpu_check"
ONE_GPU = "one GPU"  # the one skip that is no loss

# import name: (pip requirement, what for); the requirements are setup.cfg's
REQUIRED = {"torch": "torch>=2.6", "webdataset": "webdataset>=0.2.86", "PIL": "pillow>=10.0",
            "numpy": "numpy>=1.24", "yaml": "pyyaml>=6.0", "tqdm": "tqdm>=4.64"}
OPTIONAL = {"skimage": ("scikit-image>=0.21", "real photos for the loader"),
            "onnxruntime": ("onnxruntime>=1.18", "restore of .onnx"), "onnx": ("onnx>=1.16", "export"),
            "safetensors": ("safetensors>=0.4", "export"), "matplotlib": ("matplotlib>=3.7", "plots")}


def pip_command(requirements: list[str]) -> str:
    return f"{shlex.quote(sys.executable)} -m pip install {' '.join(shlex.quote(r) for r in requirements)}"


def missing_packages() -> tuple[list[str], list[str]]:
    """(required, optional) import names that cannot be imported. The required ones are imported
    (a broken install counts as missing); the optional ones only looked up."""
    required = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - ImportError, or a package that breaks on import
            required.append(name)
    optional = []
    for name in OPTIONAL:
        try:
            if importlib.util.find_spec(name) is None:
                optional.append(name)
        except (ImportError, ValueError):
            optional.append(name)
    return required, optional


def packages_line() -> tuple[str, bool]:
    """The one line about packages, and whether a required one is missing."""
    required, optional = missing_packages()
    opt = (f"optional ones missing: {', '.join(f'{n} ({OPTIONAL[n][1]})' for n in optional)}, add with: "
           f"{pip_command([OPTIONAL[n][0] for n in optional])}") if optional else "no optional one missing"
    if required:
        return (f"{PROG}: error: required packages missing: {', '.join(required)}; add them with: "
                f"{pip_command([REQUIRED[n] for n in required])} ({opt})"), True
    return f"packages: every required one here; {opt}", False


# ----------------------------------------------------------------------------- the run's state


class Skip(Exception):
    """A stage that cannot run here (no second GPU, no shards, no time): its row says why."""


class StageTimeout(BaseException):
    """Its time limit ran out (a BaseException: nothing on the way swallows it)."""


def one_line(exc: BaseException | str, limit: int = 220) -> str:
    text = exc if isinstance(exc, str) else (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Check:
    """The settings, the clock, the rows and the figures of one run."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.dry = args.device == "cpu"
        self.start = time.monotonic()
        self.deadline = self.start + args.max_minutes * 60
        self.rows: list[tuple[str, str]] = []
        self.figures: dict = {}
        self.stages: dict[str, str] = {}
        self.workers: Optional[int] = 1 if self.dry else None  # data.workers, when not gpu.yaml's (/dev/shm)
        self.shards: Optional[Path] = None
        self.photos = work / "photos"
        self.batch = 4 if self.dry else 64  # the trainer's (gpu.yaml's) batch
        self.gpus = 0
        self.child: Optional[subprocess.Popen] = None

    # the clock
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, cap: float, need: float, later: float) -> float:
        """This stage's time limit: up to `cap`, leaving `later` seconds to the stages after it, but
        `need` (its least useful time) when the clock still has that; Skip when it has not."""
        left = self.left()
        if left < need:
            raise Skip(f"out of time: {max(left, 0):.0f} s of --max-minutes {self.args.max_minutes:g} left, "
                       f"it needs {need:.0f} s")
        return max(min(cap, left - later), need)

    # the report
    def row(self, name: str, text: str, **figures) -> None:
        """A row of the table: printed now, and kept in summary.json with the figures so far."""
        self.rows.append((name, text))
        self.figures.update(figures)
        print(f"  {name:<32} {text}", flush=True)
        self.save()

    def save(self) -> None:
        with open(self.work / "summary.json", "w", encoding="utf-8") as f:
            json.dump({"rows": self.rows, "figures": self.result()}, f, indent=1)

    def result(self) -> dict:
        return {**self.figures, "stages": self.stages, "work": str(self.work),
                "minutes": round((time.monotonic() - self.start) / 60, 2)}

    def say(self, text: str) -> None:
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)

    # children
    def env(self) -> dict:
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.work / "inductor-cache"))  # a rerun compiles faster
        return env

    def spawn(self, cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as f:  # the child has its own copy of the descriptor
            self.child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=self.env(),
                                          start_new_session=True)  # its own group: a timeout ends all of it
        return self.child

    def end_child(self, grace: float = 15.0) -> Optional[int]:
        """End the running child and everything it started (SIGTERM, then SIGKILL); its exit status."""
        p, self.child = self.child, None
        if p is None:
            return None
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if p.poll() is not None:
                break
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        try:  # what it left behind in its group (loader workers, compile workers, torchrun's ranks)
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return p.poll()

    def run(self, cmd: list[str], log: Path, timeout: float) -> int:
        """Run a child to its end within `timeout` s (StageTimeout after), its output into `log`."""
        p = self.spawn(cmd, log)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.end_child()
            raise StageTimeout(f"timed out after {timeout:.0f} s, see {log}") from None
        return self.end_child()

    # the trainer's config, as every stage runs it
    def model_overrides(self) -> list[str]:
        return [f"model.name={self.args.model}", f"model.preset={self.args.preset}"]

    def data_overrides(self, workers: Optional[int] = None) -> list[str]:
        out = [f"data.shards={self.shards}", f"train.batch_size={self.batch}"]
        if self.dry:
            out += ["train.device=cpu", "data.patch.size=32", "data.shuffle_buffer=32", "data.patches_per_image=16",
                    "data.val_crop=64", "train.precision=fp32", "train.compile=false"]
        workers = workers if workers is not None else self.workers
        if workers is not None:
            out.append(f"data.workers={workers}")
        return out

    def config(self, workers: Optional[int] = None):
        from restorer.formats.config import load_config

        return load_config(str(REPO / "configs" / "gpu.yaml"), self.model_overrides() + self.data_overrides(workers))

    def sync(self) -> None:
        import torch

        if not self.dry:
            torch.cuda.synchronize()


def last_json(log: Path) -> dict:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return {}
    return {}


def last_error(log: Path) -> str:
    """The line a failed tool left: its `X: error: ...` line, else its last line."""
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.exists() else []
    errors = [x for x in lines if ": error:" in x or "Error" in x.split(":")[0]]
    return one_line((errors or lines or ["no output"])[-1], 200)


class time_limit:
    """Raise StageTimeout in the main thread after `seconds` (an in-process stage)."""

    def __init__(self, seconds: float, what: str):
        self.seconds, self.what = seconds, what

    def __enter__(self):
        def on_alarm(signum, frame):
            raise StageTimeout(f"{self.what}: timed out after {self.seconds:.0f} s")

        self.previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)


# ----------------------------------------------------------------------------- 1. shards


def synthetic_photos(folder: Path, count: int, sizes: dict) -> None:
    """`count` photos, alternately JPEG q95 and PNG, from 4 noisy smooth pictures a format; the
    copies are byte-unique (the shard tool would drop duplicates)."""
    import numpy as np
    from PIL import Image

    from shards import unique_variant  # bench/shards.py

    rng = np.random.default_rng(0)
    bases: dict[str, list[bytes]] = {"JPEG": [], "PNG": []}
    for i in range(count):
        fmt = "JPEG" if i % 2 == 0 else "PNG"
        k = i // 2
        if len(bases[fmt]) < 4:
            w, h = sizes[fmt]
            low = rng.integers(0, 256, (h // 48 + 2, w // 48 + 2, 3), dtype=np.uint8)
            arr = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.float32)
            arr += rng.standard_normal(arr.shape, dtype=np.float32) * 3.0
            buf = io.BytesIO()
            Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).save(
                buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
            bases[fmt].append(buf.getvalue())
            data = bases[fmt][-1]
        else:
            data = unique_variant(bases[fmt][k % 4], fmt, i)
        (folder / f"photo_{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}").write_bytes(data)


def stage_shards(c: Check) -> None:
    from restorer.data.sharding import PackOptions, run as pack

    n = 8 if c.dry else c.args.photos
    out, marker = c.work / "shards", c.work / "shards.json"
    c.limit(120, 20, 0)
    t0 = time.perf_counter()
    recipe = {"photos": n, "dry": c.dry}
    old = json.loads(marker.read_text()) if marker.exists() else {}
    if old.get("recipe") == recipe and (out / "manifest.json").exists() and any(c.photos.glob("photo_*")):
        kind = old["kind"]
        c.shards = out
        c.row("photos and shards", f"{n} {kind} photos, reused from {out}", photos=n, photos_kind=kind)
        return
    marker.unlink(missing_ok=True)
    c.photos.mkdir(parents=True, exist_ok=True)
    for f in c.photos.iterdir():
        f.unlink()
    kind = "synthetic"
    if not c.dry and importlib.util.find_spec("skimage") is not None:
        try:
            from loader import make_photos  # bench/loader.py: scikit-image's photos at 2K, with sensor noise

            make_photos(c.photos, n, os.cpu_count() or 1)
            kind = "real"
        except (Exception, SystemExit) as e:  # noqa: BLE001 - its sample photos missing: synthetic ones
            c.say(f"scikit-image's photos: {one_line(e)}; synthetic photos instead")
            for f in c.photos.iterdir():
                f.unlink()
    if kind == "synthetic":
        sizes = {"JPEG": (512, 384), "PNG": (480, 320)} if c.dry else {"JPEG": (2560, 1600), "PNG": (2040, 1360)}
        synthetic_photos(c.photos, n, sizes)
    manifest = pack(PackOptions(sources=(str(c.photos),), val_count=2, maxcount=2 if c.dry else 8, min_side=128), out,
                    workers=os.cpu_count() or 1, force=True, log=lambda *a, **k: None)
    marker.write_text(json.dumps({"recipe": recipe, "kind": kind}))
    c.shards = out
    shards = len(manifest["splits"]["train"]["shards"]) + len(manifest["splits"]["val"]["shards"])
    c.row("photos and shards", f"{n} {kind} photos, {shards} shards in {time.perf_counter() - t0:.0f} s",
          photos=n, photos_kind=kind)


# ----------------------------------------------------------------------------- 2. /dev/shm


def stage_shm(c: Check) -> None:
    from restorer.train.loader import item_patches, ring_bytes, ring_slots, shm_problem

    cfg = c.config()
    workers = cfg.data.workers
    need = ring_bytes(cfg.data, cfg.train.batch_size)
    per_item = item_patches(cfg.data, cfg.train.batch_size)
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        c.row("/dev/shm", "none to measure here: torch picks its own shared memory")
        return
    free = st.f_bavail * st.f_frsize
    mib = lambda n: f"{n / 2**20:,.{0 if n >= 10 * 2**20 else 1}f} MiB"  # noqa: E731
    c.figures.update(shm_free_mib=round(free / 2**20), shm_need_mib=round(need / 2**20))
    problem = shm_problem(need, free, workers)
    if problem is None:
        c.row("/dev/shm", f"{mib(free)} free, the loader's rings need {mib(need)} a process "
              f"(data.workers {workers} x {ring_slots(per_item)} slots of {per_item} patches): ok")
        return
    per_worker = max(need // max(workers, 1), 1)
    c.workers = int(free * 0.9 // per_worker)
    fits = "what fits" if c.workers else "no worker's ring fits: the main process makes the batches"
    c.row("/dev/shm", f"too small: {problem}. This check goes on with data.workers={c.workers} ({fits}): "
          "the loader and trainer figures are not gpu.yaml's", shm_workers=c.workers)
    c.stages["shm"] = f"too small: data.workers={c.workers}"


# ----------------------------------------------------------------------------- 3. the loader alone


def stage_loader(c: Check) -> None:
    import torch

    from restorer.train.loader import train_loader

    if c.shards is None:
        raise Skip("no shards (stage 1 made none)")
    seconds = c.args.seconds
    limit = c.limit(seconds + 60, seconds + 10, later=(seconds + 90) + 60 + 30)
    seconds = min(seconds, limit - 10)
    cfg = c.config()
    device = torch.device("cpu" if c.dry else "cuda")
    warm = max(5, 4 * cfg.data.workers) if c.dry else max(50, 4 * cfg.data.workers)
    n, t0, i, loader = 0, None, 0, None
    try:
        with time_limit(limit, "the loader"):
            loader = train_loader(cfg.data, batch_size=c.batch, seed=0, steps=10**9).on(device)  # the rings
            for i, (x, _, _) in enumerate(loader):
                if i == warm:  # every worker's shuffle buffer is full, its first batches out
                    c.sync()
                    t0 = time.perf_counter()
                elif i > warm:
                    n += x.shape[0]
                    if time.perf_counter() - t0 >= seconds:
                        break
            c.sync()
            t1 = time.perf_counter()
    finally:
        it = getattr(getattr(loader, "loader", None), "_iterator", None)  # the persistent workers: end them now
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        del loader
        gc.collect()
    if t0 is None or n == 0:
        raise RuntimeError(f"only {i} batches in {limit:.0f} s")
    rate = n / (t1 - t0)
    c.row("loader alone (to the GPU)" if not c.dry else "loader alone", f"{rate:,.0f} patches/s "
          f"(data.workers {cfg.data.workers}, {seconds:.0f} s after {warm} batches)",
          loader_patches_per_s=round(rate, 1), loader_workers=cfg.data.workers)


# ----------------------------------------------------------------------------- 4. the trainer


def read_metrics(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line being written
    return out


def windows(lines: list[dict], batch: int) -> list[tuple[int, int, float]]:
    """(last step, steps, seconds) of each training log line's window: its patches / its patches/s."""
    out, prev = [], 0
    for m in lines:
        if m.get("event") in ("start", "resume"):
            prev = m.get("step", 0)
        elif "patches_per_s" in m and m["step"] > prev and m["patches_per_s"] > 0:
            steps = m["step"] - prev
            out.append((m["step"], steps, steps * batch / m["patches_per_s"]))
            prev = m["step"]
    return out


def split_windows(ws: list, skip: int, min_warm_s: float) -> tuple[list, list]:
    """(warm-up, steady) log windows: the first `skip`, and more until they add up to `min_warm_s`
    (the loader's shuffle buffers fill in the first seconds, whatever the steps)."""
    k, secs = 0, 0.0
    while k < len(ws) and (k < skip or secs < min_warm_s):
        secs += ws[k][2]
        k += 1
    return ws[:k], ws[k:]


def stage_trainer(c: Check) -> None:
    if c.shards is None:
        raise Skip("no shards (stage 1 made none)")
    seconds = c.args.seconds
    every, skip, min_warm = (5, 2, 2.0) if c.dry else (25, 2, 10.0)  # untimed: the compile, the warm-up
    limit = c.limit(60 + 300 + seconds + 45, seconds + 90, later=60 + (60 if c.gpus > 1 else 0) + 30)
    out, log = c.work / "run", c.work / "trainer.log"
    cmd = [sys.executable, "launch/train.py", "--config", "configs/gpu.yaml", *c.model_overrides(),
           *c.data_overrides(), f"train.out_dir={out}", "train.resume=false", "train.overwrite=true",
           "train.max_steps=0", "train.epochs=100000", f"train.max_minutes={limit / 60:.2f}", f"log.every={every}",
           "log.val_every=0", "log.progress=false", "checkpoint.every=100000000"]
    c.say(f"the trainer: up to {limit / 60:.1f} min; its log: {log}")
    (out / METRICS).unlink(missing_ok=True)
    t0 = time.monotonic()
    p = c.spawn(cmd, log)
    stop_margin = 20 if c.dry else 40  # after SIGTERM: the last save
    stopped = None
    try:
        while p.poll() is None:
            time.sleep(0.5)
            steady = split_windows(windows(read_metrics(out / METRICS), c.batch), skip, min_warm)[1]
            if sum(w[2] for w in steady) >= seconds:
                stopped = "measured"
            elif time.monotonic() - t0 > limit - stop_margin:
                stopped = "out of time"
            if stopped:
                os.kill(p.pid, signal.SIGTERM)  # the trainer's own stop: it saves last.pt and exits 0
                try:
                    p.wait(stop_margin)
                except subprocess.TimeoutExpired:
                    pass
                break
    finally:
        rc = c.end_child()
    wall = time.monotonic() - t0
    text = log.read_text(errors="replace") if log.exists() else ""
    fell_back = next((x.split("train.compile: ", 1)[1] for x in text.splitlines() if "train.compile: " in x), None)
    warm, steady = split_windows(windows(read_metrics(out / METRICS), c.batch), skip, min_warm)
    c.figures.update(trainer_rc=rc, trainer_wall_s=round(wall, 1))
    if fell_back:
        c.figures["trainer_compile_fell_back"] = fell_back
    if not steady:
        # a trainer that failed says why, even when the time ran out while it failed (a first compiled
        # step that raised: an H200 run once read "the compile is slower" here)
        why = (f"no step after the warm-up within {limit:.0f} s (log lines up to step "
               f"{warm[-1][0] if warm else 0}: the warm-up, or a compile, is slower)" if stopped == "out of time" and rc == 0
               else f"exit {rc}: {last_error(log)}")
        raise RuntimeError(f"{why}; see {log}")
    steps, secs = sum(w[1] for w in steady), sum(w[2] for w in steady)
    rate = steps * c.batch / secs
    warm_s = sum(w[2] for w in warm)
    note = f"; compile fell back to eager: {fell_back}" if fell_back else ""
    short = f" (only {secs:.0f} s: out of time)" if secs < seconds * 0.9 else ""
    c.row("trainer, 1 GPU" if not c.dry else "trainer", f"{rate:,.0f} patches/s, {steps / secs:.1f} steps/s over "
          f"{secs:.0f} s{short} (steps {steady[0][0] - steady[0][1]}-{steady[-1][0]}); the first {warm[-1][0]} steps "
          f"took {warm_s:.0f} s (compile, warm-up){note}",
          trainer_patches_per_s=round(rate, 1), trainer_steady_s=round(secs, 1), trainer_warmup_s=round(warm_s, 1),
          trainer_warmup_steps=warm[-1][0])
    feed = c.figures.get("loader_patches_per_s")
    if feed:
        fed = feed > 1.1 * rate
        c.row("loader / trainer", f"{feed / rate:.2f}: " + ("fed" if fed else "the GPU waits for data (more "
              "data.workers, CPUs, or a cheaper data.jpeg recipe)"), fed_ratio=round(feed / rate, 2), fed=fed)
    if rc not in (0, None) and stopped:
        c.row("trainer exit", f"exit {rc} after the SIGTERM: {last_error(log)}")


# ----------------------------------------------------------------------------- 5. the bare train step


def stage_train_step(c: Check) -> None:
    if c.dry:
        variants = [("fp32_eager", "fp32 eager"), ("fp32_cl", "fp32 + channels_last"),
                    ("compile_fp32_cl", "fp32 + cl + compile")]
    else:
        variants = [("fp32_eager", "fp32 eager"), ("bf16_cl", "bf16 + channels_last"),
                    ("compile_bf16_cl", "bf16 + cl + compile")]
    limit = c.limit(330, 90, later=(60 if c.gpus > 1 else 0) + 30)
    compile_timeout = max(30, min(240, limit - 60))
    log = c.work / "train_step.log"
    cmd = [sys.executable, "bench/train_step.py", "--device", "cpu" if c.dry else "cuda",
           "--config", "configs/gpu.yaml", "--model", c.args.model, "--preset", c.args.preset, "--batch", str(c.batch),
           "--compile-timeout", str(int(compile_timeout)), "--variants", ",".join(v for v, _ in variants)]
    if c.dry:
        cmd += ["--patch", "32", "--steps", "2", "--warmup", "1", "--rounds", "1"]
    c.say(f"the train step: up to {limit / 60:.1f} min (compiling up to {compile_timeout:.0f} s); its log: {log}")
    rc = c.run(cmd, log, limit)
    step = last_json(log)
    if not step:
        raise RuntimeError(f"exit {rc}: {last_error(log)}; see {log}")
    c.figures["train_step"] = step
    ref = step.get("fp32_eager")
    failed, fell_back, warmup = step.get("failed", {}), step.get("fell_back", {}), step.get("warmup_s", {})
    bad = []
    for name, label in variants:
        value = step.get(name)
        if value:
            text = f"{value:,.0f} patches/s"
            if ref and name != "fp32_eager":
                text += f", {value / ref:.2f}x fp32 eager"
            if name.startswith("compile") and name in warmup:
                text += f"; compile and warm-up {warmup[name]:.0f} s"
                trainer = c.figures.get("trainer_patches_per_s")
                if trainer:
                    text += f"; the trainer reaches {trainer / value:.2f} of it"
                    c.figures["trainer_vs_step"] = round(trainer / value, 3)
        elif name in fell_back:
            text = f"fell back to eager: {fell_back[name]}"
        else:
            text = f"failed: {failed.get(name, f'no figure (exit {rc}), see {log}')}"
            bad.append(name)
        c.row(f"train step: {label}", text)
    if bad:
        raise RuntimeError(f"{', '.join(bad)} failed")


# ----------------------------------------------------------------------------- 6. two processes


def stage_ddp(c: Check) -> None:
    if not c.dry and c.gpus < 2:
        raise Skip(ONE_GPU)
    if c.shards is None:
        raise Skip("no shards (stage 1 made none)")
    from restorer.train.loader import ring_bytes

    limit = c.limit(240, 60, later=30)
    steps = 4 if c.dry else 30
    workers = c.workers
    try:  # two processes' rings on this node
        st = os.statvfs("/dev/shm")
        cfg = c.config()
        per_worker = max(ring_bytes(cfg.data, c.batch) // max(cfg.data.workers, 1), 1)
        fit = int(st.f_bavail * st.f_frsize * 0.9 // (2 * per_worker))
        if fit < cfg.data.workers:
            workers = fit
    except OSError:
        pass
    out, log = c.work / "ddp", c.work / "ddp.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py",
           "--config", "configs/gpu.yaml", *c.model_overrides(), *c.data_overrides(workers), f"train.out_dir={out}",
           "train.resume=false", "train.overwrite=true", f"train.max_steps={steps}", "train.compile=false",
           "log.every=10", "log.val_every=0", "log.progress=false", "checkpoint.every=100000000"]
    c.say(f"torchrun, 2 processes: up to {limit / 60:.1f} min; its log: {log}")
    t0 = time.monotonic()
    rc = c.run(cmd, log, limit)
    done = [m for m in read_metrics(out / METRICS) if m.get("event") == "finished"]
    label = f"torchrun 2 x {'gloo' if c.dry else 'nccl'}, {steps} steps"
    if rc != 0 or not done:
        c.figures["ddp_ok"] = False
        raise RuntimeError(f"exit {rc}: {last_error(log)}; see {log}")
    c.row(label, f"ok in {time.monotonic() - t0:.0f} s (start-up and a last validation included)", ddp_ok=True)


# ----------------------------------------------------------------------------- 7. a 24 MP restore


def stage_restore(c: Check) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from restorer.infer.inference import load_network, restore_array

    limit = c.limit(120, 20, later=0)
    device = torch.device("cpu" if c.dry else "cuda")
    size, tile = ((600, 400), 128) if c.dry else ((6000, 4000), 1024)
    photos = sorted(c.photos.iterdir()) if c.photos.is_dir() else []
    if photos:
        big = np.asarray(Image.open(photos[0]).convert("RGB").resize(size, Image.BICUBIC))
    else:
        big = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    last, weights = c.work / "run" / LAST, f"the trainer's {LAST}"
    try:
        net = load_network(last, device)
    except Exception as e:  # noqa: BLE001 - no trainer run: a fresh network times the same
        c.say(f"{last}: {one_line(e)}: restoring with a fresh network")
        model = c.config().network().build().to(device, memory_format=torch.channels_last)
        net, weights = model, "fresh weights (no last.pt)"
    with time_limit(max(limit - 5, 10), "the restore"):
        restore_array(net, big[:tile, :tile].copy(), tile=tile, overlap=32, batch=4, quality=30)  # warm-up
        c.sync()
        if not c.dry:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        restore_array(net, big, tile=tile, overlap=32, batch=4, quality=30)
        c.sync()
        secs = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if not c.dry else None
    text = f"{secs:.1f} s" + (f", peak GPU memory {peak:.1f} GiB" if peak is not None else "")
    c.row(f"restore {size[0]}x{size[1]}", f"{text} (fp32, tiles of {tile}, {weights})",
          restore_s=round(secs, 2), **({"restore_peak_gib": round(peak, 2)} if peak is not None else {}))


# ----------------------------------------------------------------------------- the run


STAGES: list[tuple[str, str, Callable[[Check], None]]] = [  # key (summary, --fail), row label, stage
    ("shards", "photos and shards", stage_shards),
    ("shm", "/dev/shm", stage_shm),
    ("loader", "loader alone", stage_loader),
    ("trainer", "trainer", stage_trainer),
    ("train_step", "train step", stage_train_step),
    ("ddp", "torchrun 2 processes", stage_ddp),
    ("restore", "restore", stage_restore),
]


def run_stage(c: Check, number: int, key: str, label: str, fn: Callable[[Check], None]) -> None:
    """One stage: its rows, or one row saying why it was skipped or failed; the run goes on."""
    t0 = time.monotonic()
    c.say(f"[{number}/{len(STAGES)}] {label} (at {(t0 - c.start) / 60:.1f} min)")
    try:
        if key in c.args.fail:
            raise RuntimeError("made to fail (--fail)")
        fn(c)
        c.stages.setdefault(key, "ok")
    except Skip as e:
        c.stages[key] = f"skipped: {e}"
        c.row(label, f"skipped: {e}")
    except (Exception, StageTimeout) as e:  # noqa: BLE001 - a failed stage is a row of the report
        c.stages[key] = f"failed: {one_line(e)}"
        c.row(label, f"failed: {one_line(e)}")
    finally:
        c.end_child()
        c.figures.setdefault("stage_s", {})[key] = round(time.monotonic() - t0, 1)
        if key not in c.stages:  # a signal or Ctrl-C on the way out
            c.stages[key] = "failed: interrupted"
            c.row(label, "failed: interrupted")
        c.save()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, help="measured seconds of the loader and of the trainer, each, after "
                    "their warm-up (default 45; 5 with --device cpu)")
    ap.add_argument("--work", default="gpu-check", help="folder for photos, shards, runs and logs, kept "
                    "(default: ./gpu-check)")
    ap.add_argument("--max-minutes", type=float, default=9.0, help="hard cap on the whole run (default 9)")
    ap.add_argument("--model", choices=("seed", "dncnn", "unet", "nafnet"),
                    help="the network (default: gpu.yaml's, nafnet; unet with --device cpu)")
    ap.add_argument("--preset", choices=("cpu", "gpu"), help="its preset (default gpu; cpu with --device cpu)")
    ap.add_argument("--photos", type=int, default=64, help="2K photos for the shards (default 64)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the dry run of every stage at tiny sizes (see above)")
    # stages made to fail, by key (shards, shm, loader, trainer, train_step, ddp, restore): tests the failure rows
    ap.add_argument("--fail", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dry = args.device == "cpu"
    args.seconds = args.seconds if args.seconds is not None else (5.0 if dry else 45.0)
    args.model = args.model or ("unet" if dry else "nafnet")
    args.preset = args.preset or ("cpu" if dry else "gpu")
    args.fail = {s.strip() for s in args.fail.split(",") if s.strip()}
    if args.seconds <= 0 or args.max_minutes <= 0:
        ap.error("--seconds and --max-minutes must be > 0")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    line, missing = packages_line()
    if missing:
        print(line, file=sys.stderr, flush=True)
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        why = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else
               f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: driver, CUDA_VISIBLE_DEVICES?")
        print(f"{PROG}: error: no CUDA device here ({why}); it needs an NVIDIA GPU and a CUDA build of torch "
              "(--device cpu: a dry run of the stages on the CPU)", file=sys.stderr, flush=True)
        return 2
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    c = Check(args, work)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(128 + signal.SIGTERM))  # the summary and JSON still come

    if c.dry:
        c.gpus = 0
        what = f"DRY RUN on the CPU ({torch.get_num_threads()} threads; tiny sizes, the figures mean nothing)"
        c.figures.update(device="cpu (dry run)")
    else:
        c.gpus = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        what = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB) x {c.gpus}, CUDA {torch.version.cuda}, "
                f"cuDNN {torch.backends.cudnn.version()}")
        c.figures.update(gpu=props.name, gpus=c.gpus, cuda=torch.version.cuda)
    c.figures.update(torch=torch.__version__, model=args.model, preset=args.preset, seconds=args.seconds)
    print(f"GPU check: {what}, torch {torch.__version__}; {args.model} preset {args.preset}, gpu.yaml's recipe",
          flush=True)
    print(line, flush=True)
    print(f"logs, runs and summary.json in {work}; hard cap {args.max_minutes:g} min", flush=True)
    try:
        for number, (key, label, fn) in enumerate(STAGES, 1):
            run_stage(c, number, key, label, fn)
    finally:
        c.end_child()
        failed = [n for n, s in c.stages.items() if s.startswith("failed")]
        skipped = [n for n, s in c.stages.items() if s.startswith("skipped") and s != f"skipped: {ONE_GPU}"]
        verdict = "; ".join(f"{what}: {', '.join(names)}" for what, names in (("failed", failed), ("skipped", skipped))
                            if names)
        print(f"done in {(time.monotonic() - c.start) / 60:.1f} min; {verdict or 'every stage ran'}; "
              f"logs and runs in {work}", flush=True)
        c.save()
        print(json.dumps(c.result()), flush=True)
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
