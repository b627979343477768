"""Benchmark one full training step, side by side in one run: fp32 eager against bf16 autocast,
channels_last memory and torch.compile, alone and combined.

    python bench/train_step.py [--model seed|dncnn|unet|nafnet] [--preset cpu|gpu] [--config YAML]
                               [--device auto|cpu|cuda] [--batch N] [--patch 128] [--steps N]
                               [--warmup N] [--rounds N] [--variants a,b,...]
                               [--compile-timeout S] [--threads N]

A step is the trainer's own (restorer.train.loop.train_step on a restorer.train.loop.Training built from the
config, as the trainer builds it): uint8 input and target batches already on the device are
converted there (x.float() / 255), then forward, the loss, backward, the non-finite check, the
optimizer step and the EMA update when the config has one. The recipe is the config's: on CUDA
configs/gpu.yaml's (fused AdamW, Charbonnier loss, gradient clipping, EMA 0.999; cudnn.benchmark
on, as the trainer sets it), on CPU configs/cpu.yaml's (Adam, MSE, no EMA: what the CPU runs
train); --config picks another. Every variant starts from the same weights with a fresh optimizer.

  fp32_eager        the baseline: NCHW, fp32 (on CUDA, cuDNN convolutions use TF32 if PyTorch's
                    default torch.backends.cudnn.allow_tf32 is on; the header says)
  fp32_cl           channels_last model and batches
  bf16              torch.autocast(dtype=bfloat16)
  bf16_cl           both
  compile_fp32_cl   torch.compile(model) with channels_last
  compile_bf16_cl   torch.compile(model) with channels_last and bf16 autocast

A variant that cannot run (no bf16 on the GPU, a compile error, a compile slower than
--compile-timeout) is printed as a row 'failed: reason' and the others go on. A compiled variant
that Training.build left eager, as the trainer would (no C/C++ compiler or no Python headers here:
restorer.train.checks.compile_problem), is the row 'fell back to eager: reason', not timed. Every variant is
set up and warmed up first (compiling included: that time is shown for the compiled variants);
then the timed steps run in turn, --rounds passes over the variants, so a drift in the machine's
speed touches all of them alike. Each step is timed alone (synchronised on CUDA); the figures are
the fastest step of each variant (noise only ever slows a step down), the median is shown beside.
TFLOP/s counts forward + backward as 3 x the forward FLOPs, 2 x the convolutions' MACs per pixel.

Defaults: the seed network; on CPU batch 4, 3 steps after 1 warm-up, in 3 rounds, all cores (about
75 s on 2 cores, half of it compiling); on CUDA batch 128, 20 steps after 5 warm-ups, in 4 rounds.
The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from restorer.train import checks  # noqa: E402
from restorer.formats.config import load_config  # noqa: E402
from restorer.models import MODELS, macs_per_pixel  # noqa: E402
from restorer.train.loop import Training, train_step  # noqa: E402

VARIANTS = {  # name: (autocast bf16, channels_last, compile)
    "fp32_eager": (False, False, False),
    "fp32_cl": (False, True, False),
    "bf16": (True, False, False),
    "bf16_cl": (True, True, False),
    "compile_fp32_cl": (False, True, True),
    "compile_bf16_cl": (True, True, True),
}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class CompileTimeout(BaseException):
    """A BaseException: torch.compile swallows an Exception raised inside it and carries on."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise CompileTimeout in the main thread after `seconds` (POSIX; no limit elsewhere)."""
    if not seconds or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise CompileTimeout(f"timeout: warm-up (compiling) took over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class FellBack(Exception):
    """A compiled variant whose Training runs eager (Training.build found no toolchain)."""


def is_compiled(module: nn.Module) -> bool:
    """Whether torch.compile wrapped the module: an OptimizedModule, whose `_orig_mod` is the model."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # a torch without dynamo: it cannot have compiled anything
        return False
    return isinstance(module, OptimizedModule) or isinstance(getattr(module, "_orig_mod", None), nn.Module)


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


class Variant:
    """One variant's Training (as the trainer builds it) and device-resident batches, warmed up."""

    def __init__(self, name: str, base_model: nn.Module, device: torch.device, args) -> None:
        bf16, channels_last, compiled = VARIANTS[name]
        self.device = device
        cfg = load_config(args.config, [
            *model_overrides(args), f"train.precision={'bf16' if bf16 else 'fp32'}",
            f"train.channels_last={str(channels_last).lower()}", f"train.compile={str(compiled).lower()}", f"train.batch_size={args.batch}", f"data.patch.size={args.patch}",
            f"train.device={device.type}"])
        self.training = Training.build(cfg, device)
        if compiled and not is_compiled(self.training.runner):
            raise FellBack(checks.compile_problem(device.type) or "Training.build returned the module uncompiled")
        self.training.model.load_state_dict(base_model.state_dict())
        gen = torch.Generator(device="cpu").manual_seed(0)
        shape = (args.batch, 3, args.patch, args.patch)
        # uint8 batches resident on the device, as the loader's uploads arrive there (channels-last strides)
        self.batches = []
        for _ in range(2):
            target = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
            noisy = (target.short() + torch.randint(-12, 13, shape, generator=gen)).clamp(0, 255).to(torch.uint8)
            quality = torch.randint(10, 96, (args.batch,), generator=gen).float().to(device)
            self.batches.append((*(t.to(device).contiguous(memory_format=torch.channels_last) for t in (noisy, target)),
                                 quality))
        self.calls = 0
        self.times: list[float] = []
        t0 = time.perf_counter()
        with time_limit(args.compile_timeout if compiled else None):
            for _ in range(args.warmup):
                self.step()
            self.sync()
        self.warmup_s = time.perf_counter() - t0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> None:
        train_step(self.training, [self.batches[self.calls % len(self.batches)]])
        self.calls += 1

    def timed_steps(self, n: int) -> None:
        self.sync()
        for _ in range(n):
            t = time.perf_counter()
            self.step()
            self.sync()
            self.times.append(time.perf_counter() - t)


def model_overrides(args) -> list[str]:
    """The network's config overrides: --model, and --preset when given (else the config's own)."""
    return [f"model.name={args.model}", *([f"model.preset={args.preset}"] if args.preset else [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="seed", choices=sorted(MODELS), help="the network (default: seed)")
    ap.add_argument("--preset", choices=("cpu", "gpu"),
                    help="its preset (default: the config's: gpu in gpu.yaml, cpu in cpu.yaml)")
    ap.add_argument("--config", help="the recipe (optimizer, loss, EMA, model options): default configs/gpu.yaml "
                    "on CUDA, configs/cpu.yaml on CPU")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    ap.add_argument("--batch", type=int, help="patches per step (default: 4 on CPU, 128 on CUDA)")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--steps", type=int, help="timed steps per variant (default: 3 on CPU, 20 on CUDA)")
    ap.add_argument("--warmup", type=int, help="untimed steps first, compiling included (1 on CPU, 5 on CUDA)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    ap.add_argument("--compile-timeout", type=float,
                    help="seconds a compiled variant's warm-up may take before it is reported as failed "
                    "(default: 120 on CPU, 300 on CUDA; 0: no limit)")
    ap.add_argument("--rounds", type=int, help="passes over the variants the timed steps are split into "
                    "(default: --steps, one step per variant per pass)")
    ap.add_argument("--threads", type=int, help="CPU threads (default: all cores available to this process)")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: this PyTorch build sees no CUDA device")
    args.config = args.config or str(REPO / "configs" / ("gpu.yaml" if cuda else "cpu.yaml"))
    args.batch = args.batch or (128 if cuda else 4)
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = max(1, args.warmup if args.warmup is not None else (5 if cuda else 1))
    if args.compile_timeout is None:
        args.compile_timeout = 300.0 if cuda else 120.0
    args.rounds = max(1, min(args.rounds or (4 if cuda else args.steps), args.steps))
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        ap.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads or cores())
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the trainer: the shapes are fixed, the fastest kernels once

    torch.manual_seed(0)
    base_cfg = load_config(args.config, model_overrides(args))
    base_model = Training.build(base_cfg, torch.device("cpu")).model
    flops_px = 2 * round(macs_per_pixel(base_model, 3))
    px_per_step = args.batch * args.patch * args.patch
    train_flops = 3 * flops_px * px_per_step

    if cuda:
        name = torch.cuda.get_device_name(device)
        tf32 = getattr(torch.backends.cudnn, "allow_tf32", None)
        hw = f"{name}, cuDNN TF32 for fp32 convolutions: {'on' if tf32 else 'off' if tf32 is not None else '?'}"
    else:
        hw = f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {device} ({hw})")
    o = base_cfg.optim
    recipe = f"{o.name}, {o.loss} loss, grad clip {o.grad_clip or 'off'}, EMA {o.ema or 'off'}"
    config = Path(args.config).resolve()
    config_name = str(config.relative_to(REPO)) if config.is_relative_to(REPO) else args.config
    print(f"recipe of {config_name}: {recipe}; model preset {base_cfg.model.preset or '(none)'}")
    print(f"{args.model}: {sum(p.numel() for p in base_model.parameters()):,} parameters, "
          f"{flops_px / 1e6:.4f} MFLOP per output pixel forward (2 x {flops_px // 2:,} MACs); "
          f"a training step ~ 3x = {3 * flops_px / 1e6:.4f} MFLOP per pixel")
    print(f"batch {args.batch} x 3 x {args.patch} x {args.patch}, {args.warmup} warm-up + {args.steps} timed steps, "
          f"{train_flops / 1e9:.1f} GFLOP per step")
    print(flush=True)

    results: dict[str, dict] = {}
    ready: dict[str, Variant] = {}
    bf16_ok = not cuda or torch.cuda.is_bf16_supported()
    for name in names:  # set up and warm up (compile) every variant
        bf16, _, compiled = VARIANTS[name]
        if bf16 and not bf16_ok:
            results[name] = {"failed": "no bf16 on this GPU"}
            continue
        if compiled:
            torch._dynamo.reset()
        try:
            ready[name] = Variant(name, base_model, device, args)
            results[name] = {}
            print(f"  ... {name}: ready ({ready[name].warmup_s:.1f} s warm-up)", file=sys.stderr, flush=True)
        except CompileTimeout as exc:
            results[name] = {"failed": str(exc)}
        except FellBack as exc:
            results[name] = {"fell_back": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a broken variant is a row of the report
            results[name] = {"failed": one_line(exc)}
        if "fell_back" in results[name]:
            print(f"  ... {name}: fell back to eager: {results[name]['fell_back']}", file=sys.stderr, flush=True)
        if "failed" in results[name]:
            print(f"  ... {name}: failed: {results[name]['failed']}", file=sys.stderr, flush=True)
            if cuda:
                torch.cuda.empty_cache()
    # then time them in turn, a few steps each per round, so a drift in the machine's speed
    # (other processes, clocks) touches every variant alike; a step's figure is the fastest one
    per_round = max(1, args.steps // args.rounds)
    for r in range(args.rounds):
        for name, v in list(ready.items()):
            n = per_round if r < args.rounds - 1 else args.steps - per_round * (args.rounds - 1)
            try:
                v.timed_steps(n)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory with every variant resident
                results[name] = {"failed": one_line(exc)}
                del ready[name]
    for name, v in ready.items():
        results[name] = {"step_s": min(v.times), "median_s": statistics.median(v.times), "warmup_s": v.warmup_s}

    ref = results.get("fp32_eager", {}).get("step_s")
    header = f"{'variant':<17} {'patches/s':>10} {'ms/step':>9} {'speed-up':>9} {'TFLOP/s':>8} {'median ms':>10}  note"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        if "failed" in r:
            print(f"{name:<17} {'failed: ' + r['failed']}")
            continue
        if "fell_back" in r:
            print(f"{name:<17} {'fell back to eager: ' + r['fell_back']}")
            continue
        speedup = f"{ref / r['step_s']:.2f}x" if ref else "-"
        note = f"warm-up incl. compile {r['warmup_s']:.1f} s" if VARIANTS[name][2] else ""
        print(f"{name:<17} {args.batch / r['step_s']:>10.1f} {r['step_s'] * 1e3:>9.1f} {speedup:>9} "
              f"{train_flops / r['step_s'] / 1e12:>8.3f} {r['median_s'] * 1e3:>10.1f}  {note}".rstrip())

    ok = {n: r for n, r in results.items() if "step_s" in r}
    best = min(ok, key=lambda n: ok[n]["step_s"]) if ok else None
    summary = {"model": args.model, "device": str(device) if not cuda else f"{device} ({torch.cuda.get_device_name(device)})",
               "torch": torch.__version__, "config": config_name, "recipe": recipe,
               "threads": torch.get_num_threads(), "batch": args.batch,
               "patch": args.patch, "steps": args.steps, "rounds": args.rounds,
               "mflop_per_pixel_forward": round(flops_px / 1e6, 6)}
    for name, r in results.items():
        summary[name] = round(args.batch / r["step_s"], 3) if "step_s" in r else None
    failed = {n: r["failed"] for n, r in results.items() if "failed" in r}
    if failed:
        summary["failed"] = failed
    fell_back = {n: r["fell_back"] for n, r in results.items() if "fell_back" in r}
    if fell_back:
        summary["fell_back"] = fell_back
    summary["warmup_s"] = {n: round(r["warmup_s"], 2) for n, r in results.items() if "warmup_s" in r}
    summary["best"] = best
    summary["speedup_best"] = round(ref / ok[best]["step_s"], 3) if best and ref else None
    if best:
        summary["tflops_best"] = round(train_flops / ok[best]["step_s"] / 1e12, 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
