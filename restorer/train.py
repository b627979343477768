"""The training loop. Read top to bottom: setup, resume, then one loop of optimizer steps.

    torchrun --nproc_per_node=N launch/train.py --config configs/X.yaml [key=value ...]
    python launch/train.py --config configs/cpu.yaml            (one process)

Every rank runs the same number of steps (the data pipeline guarantees equal batches per rank).
Rank 0 writes the run directory: config.yaml, metrics.jsonl, last.pt, best.pt. SIGTERM or SIGUSR1
on any rank: all ranks agree at the next step boundary, rank 0 saves, all exit 0.
Starting again with the same out_dir resumes from last.pt.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from restorer import dist
from restorer.checkpoint import BEST, LAST, keep_step_copy, load_checkpoint, save_checkpoint
from restorer.config import Config, ConfigError, dump_config, load_config
from restorer.data.manifest import ManifestError
from restorer.data.pipeline import split_urls, steps_per_epoch, train_loader, val_loader
from restorer.metrics import psnr, ssim
from restorer.models import build_model

PROG = "train"


class TrainingError(Exception):
    """The run cannot go on (e.g. the loss keeps diverging); one line for the user."""


# ----------------------------------------------------------------------------- pieces of the loop


def loss_fn(name: str):
    return {"mse_sum": lambda out, y: F.mse_loss(out, y, reduction="sum"),
            "mse": F.mse_loss,
            "l1": F.l1_loss}[name]


def lr_multiplier(cfg: Config, total_steps: int):
    """The schedule as a function of the step: linear warmup, then constant, cosine or step decay."""
    o = cfg.optim

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            t = (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps)
            return o.min_lr_scale + (1 - o.min_lr_scale) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if o.schedule == "step":
            return o.step_gamma ** ((step - o.warmup_steps) // o.step_every)
        return 1.0

    return f


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """The seed's groups: everything at lr, the `last` layer at lr x last_lr_scale."""
    o = cfg.optim
    last = [p for n, p in model.named_parameters() if n.startswith("last.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("last.")]
    groups = [{"params": rest, "lr": o.lr}, {"params": last, "lr": o.lr * o.last_lr_scale}]
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def to_model_input(batch: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 N x C x H x W (channels-last memory from the loader) -> float in [0, 1] on the device."""
    x = batch.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def validate(model: nn.Module, cfg: Config, info: dist.DistInfo) -> dict:
    """PSNR and SSIM of the model output and of the JPEG input on this rank's share of the
    validation images, summed over all ranks: exact means, whatever the split."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=info.device)  # psnr, psnr_jpeg, ssim, ssim_jpeg, images
    for inputs, targets, _ in val_loader(cfg.data, rank=info.rank, world_size=info.world_size,
                                         pin_memory=info.device.type == "cuda"):
        x = to_model_input(inputs, info.device, cfg.train.channels_last)
        y = to_model_input(targets, info.device, cfg.train.channels_last)
        with autocast(info.device, cfg.train.precision):
            out = model(x)
        out = out.float().clamp_(0, 1)
        sums += torch.stack([psnr(out, y).sum(), psnr(x, y).sum(), ssim(out, y).sum(), ssim(x, y).sum(),
                             torch.tensor(float(len(x)), device=info.device)]).double()
    model.train(was_training)
    dist.all_reduce(sums)
    n = max(sums[4].item(), 1)
    return {"val_psnr": sums[0].item() / n, "val_psnr_jpeg": sums[1].item() / n,
            "val_ssim": sums[2].item() / n, "val_ssim_jpeg": sums[3].item() / n, "val_images": int(sums[4].item())}


class StopRequest:
    """SIGTERM and SIGUSR1 (what SLURM and torchrun send) set a flag; the loop acts on it at the
    next step boundary. Ctrl-C stays a KeyboardInterrupt: the last checkpoint is kept.

    A watchdog exits by force `grace_s` after the signal in case a step never ends (a peer died
    inside a collective), so the process is gone before torchrun or SLURM resort to SIGKILL.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, grace_s: float):
        self.signal: Optional[str] = None
        self.grace_s = grace_s
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            timer = threading.Timer(self.grace_s, lambda: os._exit(1))
            timer.daemon = True
            timer.start()


class MetricsLog:
    """Rank 0's metrics.jsonl (one JSON object a line, appended) and optional TensorBoard scalars."""

    def __init__(self, out_dir: Path, tensorboard: bool):
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            with contextlib.suppress(ImportError):  # tensorboard is an optional extra
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def checkpoint_state(model, ema, optimizer, scheduler, scaler, cfg: Config, step: int, epoch: int,
                     best_psnr: float, model_args: dict) -> dict:
    state = {
        "model": model.state_dict(),  # the bare model: no `module.` or `_orig_mod.` prefixes
        "model_name": cfg.model.name,
        "model_args": model_args,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "epoch": epoch,
        "best_psnr": best_psnr,
        "config": cfg.to_dict(),
        "rng": {"torch": torch.get_rng_state()},
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state()
    return state


# ----------------------------------------------------------------------------- the run


def check_data(cfg: Config) -> None:
    """Fail before any work if the shards cannot be found (ConfigError: one line, exit 2)."""
    try:
        if not split_urls(cfg.data, "train"):
            raise ConfigError("data: no training shards (the manifest's train split is empty)")
        steps_per_epoch(cfg.data, cfg.train.batch_size, 1)
    except ManifestError as e:
        raise ConfigError(f"data.shards: {e}") from None


def train(cfg: Config) -> dict:
    info = dist.init_distributed(cfg.train.device)
    out_dir = Path(cfg.train.out_dir)
    torch.manual_seed(cfg.train.seed)
    stop = StopRequest(cfg.train.stop_grace_s)

    # --- model, optimizer, schedule
    model_args = {"in_channels": cfg.data.patch.channels, "residual": cfg.model.residual}
    model = build_model(cfg.model.name, **model_args).to(info.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.optim.ema else None
    optimizer = make_optimizer(model, cfg)
    micro_batch = cfg.train.batch_size
    steps_epoch = steps_per_epoch(cfg.data, micro_batch * cfg.train.grad_accum, info.world_size)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps))
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.train.precision == "fp16")
    criterion = loss_fn(cfg.optim.loss)

    # --- resume
    step, best_psnr = 0, -math.inf
    if cfg.train.resume and (out_dir / LAST).exists():
        state = load_checkpoint(out_dir / LAST)
        if (state["model_name"], state["model_args"]) != (cfg.model.name, model_args):
            raise TrainingError(f"{out_dir / LAST} is a {state['model_name']} {state['model_args']} checkpoint, "
                                f"not {cfg.model.name} {model_args}: use another train.out_dir, or train.resume=false")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["torch"])
        step, best_psnr = state["step"], state["best_psnr"]
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        log = MetricsLog(out_dir, cfg.log.tensorboard)
        log.write({"event": "resume" if step else "start", "step": step, "world_size": info.world_size,
                   "steps_per_epoch": steps_epoch, "total_steps": total_steps})

    ddp = DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None) \
        if info.world_size > 1 else model
    runner = torch.compile(ddp) if cfg.train.compile else ddp

    def save(name_step: int, *, best: bool = False) -> None:
        """Rank 0 writes, everyone waits: no rank runs ahead of a checkpoint it may need."""
        if info.is_main:
            state = checkpoint_state(model, ema, optimizer, scheduler, scaler, cfg, name_step,
                                     name_step // steps_epoch, best_psnr, model_args)
            save_checkpoint(out_dir / (BEST if best else LAST), state)
            if not best and cfg.checkpoint.keep:
                keep_step_copy(out_dir, name_step, state, cfg.checkpoint.keep)
        dist.barrier()

    def run_validation() -> None:
        nonlocal best_psnr
        metrics = validate(ema if ema is not None else model, cfg, info)
        better = metrics["val_images"] > 0 and metrics["val_psnr"] > best_psnr
        if better:
            best_psnr = metrics["val_psnr"]
        if info.is_main:
            log.write({"step": step, "epoch": step / steps_epoch, **metrics})
            if bar is not None:
                bar.write(f"step {step}: val PSNR {metrics['val_psnr']:.2f} dB (JPEG {metrics['val_psnr_jpeg']:.2f}), "
                          f"SSIM {metrics['val_ssim']:.4f} (JPEG {metrics['val_ssim_jpeg']:.4f})")
        if better:
            save(step, best=True)

    # --- the loop
    loader = train_loader(cfg.data, batch_size=micro_batch, seed=cfg.train.seed, rank=info.rank,
                          world_size=info.world_size, epoch=step // steps_epoch, step=step,
                          steps=steps_epoch * cfg.train.grad_accum, pin_memory=info.device.type == "cuda")
    bar = None
    if info.is_main and cfg.log.progress:
        from tqdm import tqdm

        # in a log file (SLURM, nohup) a redraw every minute, not ten a second
        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 60)
    window = {"loss": 0.0, "target": 0.0, "steps": 0, "patches": 0, "t": time.perf_counter()}
    nonfinite_in_row = nonfinite_total = 0
    stopped_by = None
    model.train()
    while step < total_steps and stopped_by is None:
        epoch = step // steps_epoch
        batches = iter(loader)
        for _ in range(steps_epoch - step % steps_epoch):
            # one optimizer step: grad_accum micro-batches, gradients synced on the last only
            loss_sum = target_sum = 0.0
            for micro in range(cfg.train.grad_accum):
                inputs, targets = next(batches)
                x = to_model_input(inputs, info.device, cfg.train.channels_last)
                y = to_model_input(targets, info.device, cfg.train.channels_last)
                sync = micro == cfg.train.grad_accum - 1 or ddp is model
                with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast(info.device, cfg.train.precision):
                    out = runner(x)
                    loss = criterion(out.float(), y)
                scaler.scale(loss / cfg.train.grad_accum).backward()
                loss_sum += loss.detach()
                with torch.no_grad():
                    target_sum += criterion(x, y)
            # one collective a step: did any rank get a signal, or a non-finite loss?
            # (on the device: nccl reduces CUDA tensors only)
            flags = dist.all_reduce(torch.stack([torch.tensor(float(stop.signal is not None), device=info.device),
                                                 (~torch.isfinite(torch.as_tensor(loss_sum, device=info.device))).float()]),
                                    op=torch.distributed.ReduceOp.MAX).tolist()
            if flags[1]:
                optimizer.zero_grad(set_to_none=True)
                nonfinite_in_row += 1
                nonfinite_total += 1
                if nonfinite_in_row >= cfg.train.max_nonfinite:
                    raise TrainingError(f"{nonfinite_in_row} non-finite losses in a row at step {step}: "
                                        "lower optim.lr, set optim.grad_clip, or use precision fp32/bf16")
            else:
                nonfinite_in_row = 0
                if cfg.optim.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    with torch.no_grad():
                        for e, p in zip(ema.parameters(), model.parameters()):
                            e.lerp_(p, 1 - cfg.optim.ema)
            step_lr = optimizer.param_groups[0]["lr"]  # the lr this step used
            scheduler.step()
            step += 1
            window["loss"] += float(loss_sum) / cfg.train.grad_accum
            window["target"] += float(target_sum) / cfg.train.grad_accum
            window["steps"] += 1
            window["patches"] += micro_batch * cfg.train.grad_accum * info.world_size

            if info.is_main and (step % cfg.log.every == 0 or step == total_steps):
                now = time.perf_counter()
                record = {"step": step, "epoch": step / steps_epoch, "loss": window["loss"] / window["steps"],
                          "target": window["target"] / window["steps"], "lr": step_lr,
                          "patches_per_s": window["patches"] / (now - window["t"]), "nonfinite": nonfinite_total}
                log.write(record)
                if bar is not None:
                    bar.set_description(f"epoch {epoch}", refresh=False)
                    bar.set_postfix(loss=f"{record['loss']:.4g}", target=f"{record['target']:.4g}",
                                    patches_s=f"{record['patches_per_s']:.0f}", refresh=False)
                window = {"loss": 0.0, "target": 0.0, "steps": 0, "patches": 0, "t": now}
            if bar is not None:
                bar.update()
            if flags[0]:
                stopped_by = stop.signal or "a signal on another rank"
                break
            if cfg.log.val_every and step % cfg.log.val_every == 0 and step < total_steps:
                run_validation()
            if step % cfg.checkpoint.every == 0 and step < total_steps:
                save(step)
            if step >= total_steps:
                break

    if stopped_by is None:
        run_validation()
    save(step)
    if bar is not None:
        bar.close()
    if info.is_main:
        log.write({"event": "stopped" if stopped_by else "finished", "step": step, "signal": stopped_by,
                   "nonfinite": nonfinite_total})
        log.close()
        if stopped_by:
            print(f"{PROG}: stopped by {stopped_by} at step {step}; {out_dir / LAST} saved. "
                  "Run the same command to resume.", file=sys.stderr)
    dist.shutdown()
    return {"step": step, "stopped_by": stopped_by, "best_psnr": best_psnr}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description="Train the JPEG artifact removal network "
                                "(torchrun --nproc_per_node=N launch/train.py --config configs/X.yaml [key=value ...]).")
    p.add_argument("--config", help="YAML config file (configs/seed.yaml, configs/gpu.yaml, configs/cpu.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=100 data.shards=DIR")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    rank = dist.rank_env()[0]
    try:
        cfg = load_config(args.config, args.overrides)
        check_data(cfg)
    except ConfigError as e:
        if rank == 0:  # one line, not one per rank
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except TrainingError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; the last checkpoint is kept: run the same command to resume", file=sys.stderr)
        return 130
    return 0
