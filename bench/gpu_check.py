"""The GPU checks in one command, for any machine with CUDA (`make gpu-check`):

    python bench/gpu_check.py [--seconds 60] [--model nafnet] [--preset gpu] [--work DIR]

1. train step: bench/train_step.py on the GPU, fp32 eager against bf16 + channels_last + compile;
2. is the GPU fed? shards of generated 2K photos, then for --seconds each: the training loader alone
   (configs/gpu.yaml's data settings, batches uploaded to the GPU), and the trainer itself on one
   GPU (launch/train.py --config configs/gpu.yaml); patches/s of both and their ratio;
3. torchrun with 2 processes on nccl, when the machine has two GPUs: a short run must finish;
4. restore of a 6000 x 4000 photo: seconds and peak GPU memory.

Prints a table and, as its last line, one JSON object of the figures. Without CUDA it says so and
exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def run(cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, timeout=timeout)


def last_json(log: Path) -> dict:
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def loader_alone(shards: Path, seconds: float, batch: int) -> float:
    """patches/s of gpu.yaml's training loader, batches uploaded to the GPU, nothing else."""
    from restorer.config import load_config
    from restorer.data.pipeline import train_loader

    cfg = load_config(str(REPO / "configs" / "gpu.yaml"), [f"data.shards={shards}", f"train.batch_size={batch}"])
    loader = train_loader(cfg.data, batch_size=batch, seed=0, steps=10**9, device=torch.device("cuda"))
    n, t0 = 0, None
    for i, (x, y, _) in enumerate(loader):
        if i == 50:  # the shuffle buffers are full and the workers warm
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        elif i > 50:
            n += x.shape[0]
            if time.perf_counter() - t0 > seconds:
                break
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--model", default="nafnet")
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--work", help="folder for shards, runs and logs (default: a temporary one)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device here", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count()
    rows: dict[str, str] = {}
    figures: dict = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        py = sys.executable

        # 1. the train step
        log = work / "train_step.log"
        p = run([py, "bench/train_step.py", "--device", "cuda", "--model", args.model, "--preset", args.preset,
                 "--variants", "fp32_eager,bf16_cl,compile_bf16_cl"], log, 1800)
        step = last_json(log)
        figures["train_step"] = step
        rows["train step fp32 eager"] = f"{step.get('fp32_eager')} patches/s"
        rows["train step bf16+cl+compile"] = (f"{step.get('compile_bf16_cl')} patches/s "
                                              f"({step.get('speedup_best')}x)" if p.returncode == 0 else f"failed, see {log}")

        # 2. is the GPU fed?
        from loader import make_photos  # bench/loader.py: 2K photos that decode like camera pictures
        from restorer.data.sharding import PackOptions, run as pack

        src, shards = work / "photos", work / "shards"
        src.mkdir(exist_ok=True)
        make_photos(src, args.photos, os.cpu_count() or 1)
        pack(PackOptions(sources=(str(src),), val_count=2, maxcount=8, min_side=128), shards,
             workers=os.cpu_count() or 1, force=True, log=lambda *a: None)
        batch = 64
        feed = loader_alone(shards, args.seconds, batch)
        out = work / "run"
        p = run([py, "launch/train.py", "--config", "configs/gpu.yaml", f"data.shards={shards}", f"train.out_dir={out}",
                 "train.resume=false", "train.overwrite=true", f"train.max_minutes={args.seconds / 60}",
                 "train.max_steps=0", "train.epochs=100000", "log.every=20", "log.val_every=0", "log.progress=false",
                 f"model.name={args.model}", f"model.preset={args.preset}"], work / "train.log", args.seconds * 10 + 600)
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if p.returncode == 0 else []
        rates = [m["patches_per_s"] for m in lines if "patches_per_s" in m][2:]  # past compiling and warm-up
        trainer = float(np.median(rates)) if rates else None
        figures.update(loader_patches_per_s=round(feed, 1), trainer_patches_per_s=trainer and round(trainer, 1),
                       fed_ratio=trainer and round(feed / trainer, 2))
        rows["loader alone (gpu.yaml, to the GPU)"] = f"{feed:.0f} patches/s"
        rows["trainer, 1 GPU"] = f"{trainer:.0f} patches/s" if trainer else f"failed, see {work / 'train.log'}"
        if trainer:
            rows["loader / trainer"] = f"{feed / trainer:.2f} ({'fed' if feed > 1.1 * trainer else 'the GPU waits for data'})"

        # 3. two processes on nccl
        if gpus >= 2:
            p = run([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py",
                     "--config", "configs/gpu.yaml", f"data.shards={shards}", f"train.out_dir={work / 'ddp'}",
                     "train.max_steps=50", "log.progress=false", "log.val_every=0", "train.compile=false",
                     f"model.name={args.model}", f"model.preset={args.preset}"], work / "ddp.log", 900)
            rows["torchrun 2 x nccl, 50 steps"] = "ok" if p.returncode == 0 else f"failed, see {work / 'ddp.log'}"
            figures["ddp_nccl_ok"] = p.returncode == 0
        else:
            rows["torchrun 2 x nccl"] = "skipped: one GPU"

        # 4. restore a 6000 x 4000 photo
        from PIL import Image

        from restorer.inference import load_network, restore_array

        big = np.asarray(Image.open(src / sorted(os.listdir(src))[0]).convert("RGB").resize((6000, 4000)))
        net = load_network(out / "last.pt", "cuda") if (out / "last.pt").exists() else None
        if net is not None:
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            restore_array(net, big, tile=1024, overlap=32, batch=4)
            torch.cuda.synchronize()
            secs = time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated() / 2**30
            rows["restore 6000x4000"] = f"{secs:.1f} s, peak GPU memory {peak:.1f} GiB"
            figures.update(restore_24mp_s=round(secs, 2), restore_peak_gib=round(peak, 2))

    width = max(map(len, rows))
    print(f"GPU check on {figures['gpu']} x {gpus}, torch {torch.__version__}, {args.model} preset {args.preset}")
    for k, v in rows.items():
        print(f"  {k:<{width}}  {v}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
