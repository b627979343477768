"""The training loop. `train()` reads top to bottom: set up, resume, then one loop of optimizer steps
with validation and checkpoints; each piece is a plain function above it.

    torchrun --nproc_per_node=N launch/train.py --config configs/X.yaml [key=value ...]
    python launch/train.py --config configs/cpu.yaml            (one process)

Every rank runs the same number of steps (the data pipeline guarantees equal batches per rank).
Rank 0 writes the run directory: config.yaml, metrics.jsonl, last.pt, best.pt. SIGTERM or SIGUSR1
on any rank: all ranks agree at the next step boundary (or inside validation), rank 0 saves, all
exit 0. Starting again with the same out_dir resumes from last.pt.

No step waits for the device: losses and counters accumulate on it and are read at log steps; the
flags every rank must agree on (a stop signal, the time spent, a run of non-finite steps) go through
one small all-reduce a step that is read one step later.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from restorer import dist
from restorer.checkpoint import (BEST, LAST, Checkpoint, CheckpointError, best_psnr_on_disk, keep_step_copy,
                                 load_latest, remove_run_files, remove_stale_temp_files, run_files, save_checkpoint)
from restorer.cli import Parser, UsageError, fail
from restorer.config import Config, ConfigError, config_from_dict, dump_config, load_config
from restorer.data.manifest import ManifestError
from restorer.data.pipeline import (NoTrainingData, check_shards, ring_bytes, shm_problem, split_urls, steps_per_epoch,
                                    train_loader, val_loader)
from restorer.inference import autocast, to_float
from restorer.metrics import psnr, ssim
from restorer.models import describe, load_weights
from restorer.stop import StopRequest

PROG = "train"


class TrainingError(Exception):
    """The run cannot go on (e.g. the loss keeps diverging); one line for the user."""


# ----------------------------------------------------------------------------- the step


def psnr_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean over images of 10 log10(MSE): minus their PSNR (NAFNet's PSNRLoss). Every image
    counts by its relative error: a q90 patch, whose error is a hundredth of a q10 patch's, weighs
    as much as it, where a plain MSE would let the network spoil the finely compressed ones."""
    return 10.0 / math.log(10.0) * torch.log((out - y).square().flatten(1).mean(1) + 1e-10).mean()


def loss_fn(cfg: Config):
    name, eps = cfg.optim.loss, cfg.optim.charbonnier_eps
    if name == "charbonnier":  # a smooth L1 (Lai et al. 2017); KAIR trains its JPEG SwinIR with it
        return lambda out, y: torch.sqrt((out - y).square() + eps * eps).mean()
    if name == "psnr":
        return psnr_loss
    return {"mse_sum": lambda out, y: F.mse_loss(out, y, reduction="sum"),
            "mse": F.mse_loss,
            "l1": F.l1_loss}[name]


def lr_multiplier(cfg: Config, step: int, progress: float) -> float:
    """The schedule: linear warmup over the first steps, then constant, cosine or step decay.
    `progress` (0 to 1) is how far the run is: steps done / total, or time spent / budget."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        return o.min_lr_scale + (1 - o.min_lr_scale) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if o.schedule == "step":
        return o.step_gamma ** ((step - o.warmup_steps) // o.step_every)
    return 1.0


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """The seed's groups: everything at lr, the `last` layer at lr x last_lr_scale. Fused (one kernel
    for all parameters) where the device has it: it also skips a non-finite step on the device."""
    o = cfg.optim
    last = [p for n, p in model.named_parameters() if n.startswith("last.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("last.")]
    groups = [{"params": rest, "base_lr": o.lr}, {"params": last, "base_lr": o.lr * o.last_lr_scale}]
    for g in groups:
        g["lr"] = g["base_lr"]
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    with contextlib.suppress(RuntimeError, TypeError, ValueError):  # fused needs a device that has it
        return cls(groups, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=device.type in ("cuda", "cpu"))
    return cls(groups, betas=tuple(o.betas), weight_decay=o.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, cfg: Config, step: int, progress: float) -> float:
    """Set every group's lr for this step from the config (a resumed run follows the config it is
    started with); returns the first group's."""
    mult = lr_multiplier(cfg, step, progress)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * mult
    return optimizer.param_groups[0]["lr"]


@dataclass
class Training:
    """What an optimizer step needs; built the same way by the trainer and by bench/train_step.py.

    `model` is the bare network (what checkpoints hold); `runner` is what the step calls: the model,
    compiled when asked, inside DDP in a world of more than one (`ddp`, else None). `ema` is a plain
    eager copy (validation and inference use it). The counters live on the device.
    """

    cfg: Config
    device: torch.device
    model: nn.Module
    runner: nn.Module
    ddp: Optional[DDP]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: Optional[nn.Module]
    criterion: object
    skips_on_device: bool  # the optimizer skips a non-finite step itself (fused); else one host read a step
    loss_sum: torch.Tensor = None  # sums over the steps since the last log line
    target_sum: torch.Tensor = None  # the same loss of the JPEG input (the seed's "target")
    nonfinite_streak: torch.Tensor = None  # non-finite steps in a row, so far
    nonfinite_total: torch.Tensor = None

    def __post_init__(self) -> None:
        zero = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self.loss_sum, self.target_sum, self.nonfinite_streak, self.nonfinite_total = zero(), zero(), zero(), zero()

    @classmethod
    def build(cls, cfg: Config, device: torch.device, world_size: int = 1) -> Training:
        model = cfg.network().build().to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        ema = copy.deepcopy(model).requires_grad_(False).eval() if cfg.optim.ema else None
        compile_ = cfg.train.compile
        if compile_ and (problem := compile_problem(device.type)):
            print(f"{PROG}: warning: train.compile: {problem}: running eager", file=sys.stderr, flush=True)
            compile_ = False
        # compile the module, not the DDP wrapper (DDP then sees the compiled graph's buckets)
        runner = torch.compile(model) if compile_ else model
        ddp = None
        if world_size > 1:
            ddp = DDP(runner, device_ids=[device.index] if device.type == "cuda" else None)
            runner = ddp
        optimizer = make_optimizer(model, cfg, device)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        return cls(cfg, device, model, runner, ddp, optimizer, scaler, ema, loss_fn(cfg),
                   skips_on_device=bool(optimizer.defaults.get("fused")))

    def reset_window(self) -> None:
        self.loss_sum.zero_()
        self.target_sum.zero_()


def compile_problem(device_type: str, which=shutil.which, include_dir: Optional[str] = None) -> Optional[str]:
    """Why torch.compile cannot work here, or None. Inductor compiles what it generates: Triton's
    CUDA kernels need a C compiler and Python's headers on the node, CPU kernels a C++ compiler."""
    compilers = ("cc", "gcc", "clang") if device_type == "cuda" else ("c++", "g++", "clang++")
    if not any(which(c) for c in compilers):
        return f"no C{'' if device_type == 'cuda' else '++'} compiler ({', '.join(compilers)}) on PATH"
    include_dir = include_dir if include_dir is not None else sysconfig.get_paths().get("include", "")
    if not os.path.isfile(os.path.join(include_dir, "Python.h")):
        return f"no Python headers (Python.h in {include_dir}; a python3-dev package)"
    return None


def train_step(t: Training, batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """One optimizer step over `batches` (grad_accum micro-batches of uint8 inputs and targets, and
    the inputs' JPEG qualities), gradients synchronised on the last only. Never reads a value back
    from the device: a
    non-finite gradient (identical on every rank after DDP's all-reduce) skips the update on the
    device and counts in `t.nonfinite_streak`."""
    cfg = t.cfg
    n = len(batches)
    for i, (inputs, targets, qualities) in enumerate(batches):
        x = to_float(inputs, t.device, cfg.train.channels_last)
        y = to_float(targets, t.device, cfg.train.channels_last)
        q = qualities.to(t.device, non_blocking=True)
        no_sync = t.ddp.no_sync() if t.ddp is not None and i < n - 1 else contextlib.nullcontext()
        with no_sync, autocast(t.device, cfg.train.precision):
            loss = t.criterion(t.runner(x, q).float(), y)
        t.scaler.scale(loss / n).backward()
        with torch.no_grad():
            t.loss_sum += loss.detach() / n
            t.target_sum += t.criterion(x, y) / n
    t.scaler.unscale_(t.optimizer)  # a no-op unless fp16
    params = [p for p in t.model.parameters() if p.grad is not None]
    if cfg.optim.grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    bad = (~torch.isfinite(norm)).float()
    if t.scaler.is_enabled():  # fp16: the scaler skips overflowing steps itself (and lowers its scale)
        t.scaler.step(t.optimizer)
        t.scaler.update()
    elif t.skips_on_device:
        t.optimizer.found_inf = bad  # the fused optimizers skip the whole update (state too) when it is 1
        t.optimizer.step()
        del t.optimizer.found_inf
    elif not bad.item():  # no fused optimizer on this device: one read of the flag
        t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    if t.ema is not None:
        with torch.no_grad():
            torch._foreach_lerp_(list(t.ema.parameters()), list(t.model.parameters()), 1 - cfg.optim.ema)
            for e, b in zip(t.ema.buffers(), t.model.buffers()):  # batch-norm statistics
                e.copy_(b)
    t.nonfinite_streak.mul_(bad).add_(bad)
    t.nonfinite_total.add_(bad)


@dataclass
class Agreed:
    """The flags of one step, the same on every rank."""

    step: int  # the step they were posted after
    stop: bool  # a stop signal reached some rank
    seconds: float  # training time (the slowest rank's clock)
    streak: int  # non-finite steps in a row up to that step


class StepFlags:
    """What all ranks must agree on, exchanged without stalling: after each step every rank posts
    (stop signal seen, seconds spent, non-finite streak) in an async all-reduce (max), and reads it
    after the next step has been queued. Every rank posts once a step: the collectives always match."""

    def __init__(self, device: torch.device):
        self.device = device
        self.values = torch.zeros(3, device=device)
        self.pinned = torch.zeros(3, pin_memory=device.type == "cuda")
        self.work = self.event = None
        self.step: Optional[int] = None  # the step of the post not read yet

    def post(self, step: int, stop: bool, seconds: float, streak: torch.Tensor) -> None:
        self.step = step
        self.values[0].fill_(float(stop))  # fill_ with a Python number: no upload, no wait
        self.values[1].fill_(seconds)
        self.values[2].copy_(streak)
        self.work = torch.distributed.all_reduce(self.values, op=torch.distributed.ReduceOp.MAX, async_op=True) \
            if torch.distributed.is_initialized() else None
        if self.device.type == "cuda":
            if self.work is not None:
                self.work.wait()  # orders the copy after the reduce on the device; the host goes on
            self.pinned.copy_(self.values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def read(self) -> Optional[Agreed]:
        """The last post's agreed values (None if nothing was posted since the last read)."""
        if self.step is None:
            return None
        if self.device.type == "cuda":
            self.event.synchronize()  # the previous step's end: the device is busy with this one
            vals = self.pinned.tolist()
        else:
            if self.work is not None:
                self.work.wait()
            vals = self.values.tolist()
        step, self.step = self.step, None
        return Agreed(step, bool(vals[0]), vals[1], int(vals[2]))


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model: nn.Module, cfg: Config, info: dist.DistInfo, stop: StopRequest) -> Optional[dict]:
    """PSNR and SSIM of the model output and of the JPEG input on this rank's share of the
    validation images, at each of data.val_qualities, summed over all ranks: exact means, whatever
    the split. `val_psnr` etc. are the means over images and qualities (best.pt follows val_psnr),
    `val_psnr_q30` etc. each quality's. None when a stop signal came in the middle (on any rank):
    the run then saves and exits rather than finish it."""
    was_training = model.training
    model.eval()
    qualities = list(cfg.data.val_qualities)
    row = {q: i for i, q in enumerate(qualities)}
    # per quality: psnr, psnr_jpeg, ssim, ssim_jpeg, images; then one more row: stopped
    sums = torch.zeros(len(qualities) + 1, 5, dtype=torch.float64, device=info.device)
    counts = [0] * len(qualities)  # counted on the host: nothing goes to or comes from the device per image
    stopped = False
    for inputs, targets, quality, _ in val_loader(cfg.data, rank=info.rank, world_size=info.world_size,
                                                  pin_memory=info.device.type == "cuda"):
        if stop.requested:
            stopped = True
            break
        i = row[int(quality[0])]  # the quality the JPEG's tables say: the one it was encoded at
        x = to_float(inputs, info.device, cfg.train.channels_last)
        y = to_float(targets, info.device, cfg.train.channels_last)
        with autocast(info.device, cfg.train.precision):
            out = model(x, quality.to(info.device, non_blocking=True))
        out = out.float().clamp_(0, 1)
        sums[i, :4] += torch.stack([psnr(out, y).sum(), psnr(x, y).sum(), ssim(out, y).sum(), ssim(x, y).sum()]).double()
        counts[i] += len(x)
    model.train(was_training)
    sums[:-1, 4] = torch.tensor(counts, dtype=torch.float64)
    sums[-1, 0].fill_(float(stopped))
    dist.all_reduce(sums)
    vals = sums.tolist()
    if vals[-1][0]:
        return None
    names = ("val_psnr", "val_psnr_jpeg", "val_ssim", "val_ssim_jpeg")
    total = sum(r[4] for r in vals[:-1])
    out = {name: sum(r[k] for r in vals[:-1]) / max(total, 1) for k, name in enumerate(names)}
    out["val_images"] = int(vals[0][4])  # every image is validated at every quality
    if len(qualities) > 1:
        for q, r in zip(qualities, vals):
            out.update({f"{name}_q{q}": r[k] / max(r[4], 1) for k, name in enumerate(names)})
    return out


# ----------------------------------------------------------------------------- checkpoints and resume


@dataclass
class Progress:
    """Where the run is: what a checkpoint records besides the weights."""

    step: int = 0
    best_psnr: float = -math.inf
    train_seconds: float = 0.0  # training time so far, resumed runs included


def take_checkpoint(t: Training, progress: Progress, steps_epoch: int) -> Checkpoint:
    """Everything a run needs to go on, as CPU copies (taken now: the device goes on training)."""
    return Checkpoint(
        network=t.cfg.network(),
        weights=_to_cpu(t.model.state_dict()),  # the bare model: no `module.` or `_orig_mod.` prefixes
        ema=_to_cpu(t.ema.state_dict()) if t.ema is not None else None,
        optimizer=_to_cpu(t.optimizer.state_dict()),
        scaler=t.scaler.state_dict(),
        step=progress.step,
        epoch=progress.step // steps_epoch,
        best_psnr=progress.best_psnr,
        train_seconds=progress.train_seconds,
        config=t.cfg.to_dict(),
        rng={"torch": torch.get_rng_state()},
    )


def _to_cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# keys whose change on resume means nothing for the training itself
_NOT_SETTINGS = {"train.resume", "train.overwrite", "log.progress", "log.tensorboard", "train.stop_grace_s"}


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """'key old -> new' for each setting that differs from the checkpoint's config."""
    try:
        old = _flatten(config_from_dict(saved).to_dict())
    except ConfigError:  # a checkpoint of another restorer version: compare what can be compared
        old = _flatten(saved)
    new = _flatten(cfg.to_dict())
    return [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if k not in _NOT_SETTINGS and old.get(k) != new[k]]


def prepare_run_dir(cfg: Config, info: dist.DistInfo) -> Optional[Checkpoint]:
    """Rank 0 decides whether the run resumes (and from which file) and everyone gets its decision:
    the checkpoint, None to start fresh, or the same TrainingError on every rank. A rank that
    cannot see the run folder (node-local disk, a stale NFS cache) still resumes with the rest."""
    decision: tuple[Optional[Checkpoint], Optional[str]] = (None, None)  # checkpoint, error
    if info.is_main:
        out_dir = Path(cfg.train.out_dir)
        try:
            found = load_latest(out_dir) if cfg.train.resume else None
            if found is not None:
                if found.network != cfg.network():
                    raise TrainingError(f"{found.path} is a {found.network} checkpoint, not {cfg.network()}: use "
                                        "another train.out_dir, or train.resume=false train.overwrite=true")
                best = best_psnr_on_disk(out_dir)  # best.pt's own figure: last.pt is written after it
                if best is not None:
                    found.best_psnr = max(found.best_psnr, best)
                decision = (found, None)
            elif old := run_files(out_dir):
                if cfg.train.resume:
                    # an attempt that died before its first checkpoint (a requeue, a crash): nothing to
                    # resume and nothing worth keeping; its start again replaces its files
                    print(f"{PROG}: no checkpoint in {out_dir} yet: starting at step 0 (replacing "
                          f"{', '.join(p.name for p in old)})", file=sys.stderr, flush=True)
                elif not cfg.train.overwrite:
                    what = ", ".join(p.name for p in old[:4]) + (", ..." if len(old) > 4 else "")
                    raise TrainingError(f"{out_dir} holds another run ({what}) and train.resume=false: set "
                                        "train.overwrite=true to delete it, or use another train.out_dir")
                remove_run_files(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(out_dir)
        except (TrainingError, CheckpointError, OSError) as e:
            decision = (None, str(e))
    checkpoint, error = dist.broadcast(decision)
    if error:
        raise TrainingError(error)
    return checkpoint


def resume(t: Training, checkpoint: Checkpoint) -> Progress:
    """Load a checkpoint into the training. The config the run is started with applies: its lr,
    schedule and other settings replace the checkpoint's (the optimizer keeps its moments); the
    network cannot change (prepare_run_dir refuses that)."""
    source = str(checkpoint.path)
    load_weights(t.model, checkpoint.weights, source)
    base_lrs = [g["base_lr"] for g in t.optimizer.param_groups]
    t.optimizer.load_state_dict(checkpoint.optimizer)
    for group, base_lr in zip(t.optimizer.param_groups, base_lrs):
        group["base_lr"] = base_lr  # from this run's config, not the checkpoint's
        group.update({k: v for k, v in t.optimizer.defaults.items() if k != "lr"})
    if t.scaler.is_enabled() and checkpoint.scaler:  # fp16 now but not then: a fresh scaler
        t.scaler.load_state_dict(checkpoint.scaler)
    if t.ema is not None:
        # EMA switched on at resume starts from the resumed weights, not the random initial ones
        load_weights(t.ema, checkpoint.ema if checkpoint.ema is not None else checkpoint.weights, source)
    torch.set_rng_state(checkpoint.rng["torch"])
    return Progress(step=checkpoint.step, best_psnr=checkpoint.best_psnr, train_seconds=checkpoint.train_seconds)


class Checkpointer:
    """Rank 0's checkpoint writes. A periodic checkpoint is taken at its step but written only once
    the next step's gradients are known to be finite: weights that a bad update blew up never
    reach last.pt (nor push a good step copy out of `checkpoint.keep`)."""

    def __init__(self, t: Training, info: dist.DistInfo, stop: StopRequest, steps_epoch: int):
        self.t, self.info, self.stop, self.steps_epoch = t, info, stop, steps_epoch
        self.out_dir = Path(t.cfg.train.out_dir)
        self.pending: list[Checkpoint] = []  # taken, not yet written
        self.written_step: Optional[int] = None

    def take(self, progress: Progress) -> None:
        if self.info.is_main:
            self.pending.append(take_checkpoint(self.t, progress, self.steps_epoch))

    def settle(self, agreed: Agreed, write: bool = True) -> None:
        """Write the newest pending checkpoint a later finite step has vouched for (older ones are
        superseded). While non-finite steps run, they wait: a skipped step leaves the weights as
        they were, so a finite step after the streak vouches for them (an fp16 overflow); a
        divergence never gets one. `write=False`: a save that follows makes them moot."""
        if agreed.streak:
            return
        vouched = [c for c in self.pending if c.step < agreed.step]
        self.pending = [c for c in self.pending if c.step >= agreed.step]
        if vouched and write:
            self._write(vouched[-1], LAST)

    def save_now(self, progress: Progress, name: str = LAST) -> None:
        if self.info.is_main and not (name == LAST and self.written_step == progress.step):
            self._write(take_checkpoint(self.t, progress, self.steps_epoch), name)

    def _write(self, checkpoint: Checkpoint, name: str) -> None:
        try:
            with self.stop.saving():
                save_checkpoint(self.out_dir / name, checkpoint)
                if name == LAST:
                    self.written_step = checkpoint.step
                    if self.t.cfg.checkpoint.keep:
                        keep_step_copy(self.out_dir, checkpoint.step, self.t.cfg.checkpoint.keep)
        except OSError as e:
            raise TrainingError(f"cannot write a checkpoint in {self.out_dir}: {e.strerror or e} "
                                f"({e.filename or name})") from None


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


# ----------------------------------------------------------------------------- the run


def check_data(cfg: Config, hash_shards: bool = True) -> None:
    """Fail before any work if the shards cannot be used (ConfigError: one line, exit 2).
    `hash_shards`: do data.verify's sha256 pass (once a node is enough)."""
    try:
        if not split_urls(cfg.data, "train"):
            raise ConfigError("data: no training shards (the manifest's train split is empty)")
        steps_per_epoch(cfg.data, cfg.train.batch_size, 1)
        check_shards(cfg.data, verify=cfg.data.verify and hash_shards)
    except ManifestError as e:
        raise ConfigError(f"data.shards: {e}") from None


def local_ranks() -> int:
    """Trainer processes on this node (torchrun's LOCAL_WORLD_SIZE, srun's SLURM_NTASKS_PER_NODE)."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        with contextlib.suppress(ValueError):
            return max(int(os.environ.get(name, "").split("(")[0]), 1)
    return 1


def check_shared_memory(cfg: Config, ranks_on_node: int, shm: str = "/dev/shm") -> None:
    """The workers' batch rings live in shared memory; a container's default /dev/shm (64 MB) holds
    far less than gpu.yaml needs. ConfigError (one line) naming what to change, before any work."""
    need = ring_bytes(cfg.data, cfg.train.batch_size) * ranks_on_node
    try:
        st = os.statvfs(shm)
    except OSError:
        return  # no /dev/shm to measure (not Linux): torch picks its own shared memory
    problem = shm_problem(need, st.f_bavail * st.f_frsize, cfg.data.workers)
    if problem:
        raise ConfigError(problem)


def agreed_check(info: dist.DistInfo, check) -> None:
    """Run `check` on every rank; if it fails on any, every rank raises the first failure (rank 0
    says which rank): a rank that sees another disk fails the run, not hangs it."""
    try:
        check()
        error = None
    except ConfigError as e:
        error = str(e)
    errors = dist.gather(error)
    first = next(((r, e) for r, e in enumerate(errors) if e), None)
    if first:
        rank, message = first
        raise ConfigError(message + (f" (on rank {rank})" if rank else ""))


def device_batches(loader, steps: int, grad_accum: int) -> Iterator[list]:
    """One epoch of the loader as lists of grad_accum micro-batches."""
    batches = iter(loader)
    for _ in range(steps):
        yield [next(batches) for _ in range(grad_accum)]


def train(cfg: Config) -> dict:
    info = dist.init_distributed(cfg.train.device)
    out_dir = Path(cfg.train.out_dir)
    torch.manual_seed(cfg.train.seed)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the training shapes are fixed: pick the fastest kernels once
    stop = StopRequest(cfg.train.stop_grace_s)
    agreed_check(info, lambda: (check_data(cfg, hash_shards=info.local_rank == 0),
                                check_shared_memory(cfg, local_ranks())))

    # --- network, optimizer, and the state to start from
    t = Training.build(cfg, info.device, info.world_size)
    checkpoint = prepare_run_dir(cfg, info)
    progress = resume(t, checkpoint) if checkpoint is not None else Progress()
    micro_batch = cfg.train.batch_size
    steps_epoch = steps_per_epoch(cfg.data, micro_batch * cfg.train.grad_accum, info.world_size)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_epoch
    budget_s = cfg.train.max_minutes * 60
    log = None
    if info.is_main:
        (out_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        log = MetricsLog(out_dir, cfg.log.tensorboard)
        print(f"{PROG}: network {describe(t.model, cfg.model.name)}", file=sys.stderr, flush=True)
        start = {"event": "resume" if checkpoint is not None else "start", "step": progress.step, "world_size": info.world_size,
                 "steps_per_epoch": steps_epoch, "total_steps": total_steps}
        if checkpoint is not None:
            changes = config_changes(checkpoint.config, cfg)
            print(f"{PROG}: resuming from {checkpoint.path} at step {progress.step}"
                  + (f"; settings changed since, applied now: {'; '.join(changes)}" if changes else ""),
                  file=sys.stderr, flush=True)
            start.update(checkpoint=str(checkpoint.path), changes=changes)
        log.write(start)
    del checkpoint  # the checkpoint's tensors: the model and optimizer hold their own now
    saver = Checkpointer(t, info, stop, steps_epoch)

    def run_validation() -> bool:
        """Validate (all ranks), log, save best.pt; False if a stop signal cut it short."""
        if info.is_main:
            say(f"step {progress.step}: validating")
        metrics = validate(t.ema if t.ema is not None else t.model, cfg, info, stop)
        if metrics is None:
            return False
        better = metrics["val_images"] > 0 and metrics["val_psnr"] > progress.best_psnr
        if better:
            progress.best_psnr = metrics["val_psnr"]
        if info.is_main:
            log.write({"step": progress.step, "epoch": progress.step / steps_epoch, **metrics})
            say(f"step {progress.step}: val PSNR {metrics['val_psnr']:.2f} dB (JPEG {metrics['val_psnr_jpeg']:.2f}), "
                f"SSIM {metrics['val_ssim']:.4f} (JPEG {metrics['val_ssim_jpeg']:.4f})")
        if better:
            saver.save_now(progress, BEST)
        return True

    # --- the loop
    loader = train_loader(cfg.data, batch_size=micro_batch, seed=cfg.train.seed, rank=info.rank,
                          world_size=info.world_size, epoch=progress.step // steps_epoch, step=progress.step,
                          steps=steps_epoch * cfg.train.grad_accum, device=info.device)
    bar = None
    if info.is_main and cfg.log.progress:
        from tqdm import tqdm

        # in a log file (SLURM, nohup) a redraw every minute, not ten a second
        bar = tqdm(total=total_steps, initial=progress.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 60)
    flags = StepFlags(info.device)
    seconds = progress.train_seconds  # agreed by all ranks: the slowest rank's clock
    clock = time.perf_counter() - progress.train_seconds
    window = {"steps": 0, "patches": 0, "t": time.perf_counter()}
    stopped_by, streak = None, 0
    time_up = bool(budget_s) and seconds >= budget_s  # a resumed run may have spent its budget already

    def say(text: str) -> None:
        (bar.write if bar is not None else print)(f"{PROG}: {text}", file=sys.stderr)

    def agree(write: bool = True) -> None:
        """Act on the last step's agreed flags: settle checkpoints, stop on divergence or a signal."""
        nonlocal seconds, streak, stopped_by, time_up
        agreed = flags.read()
        if agreed is None:
            return
        seconds, streak = agreed.seconds, agreed.streak
        saver.settle(agreed, write)
        if streak >= cfg.train.max_nonfinite:
            raise TrainingError(f"{streak} non-finite steps in a row at step {agreed.step}: lower optim.lr, set "
                                f"optim.grad_clip, or use precision fp32/bf16; {LAST} keeps the last good weights")
        if agreed.stop and not stopped_by:
            stopped_by = stop.signal or "a signal on another rank"
        time_up = bool(budget_s) and seconds >= budget_s

    t.model.train()
    while progress.step < total_steps and not stopped_by and not time_up:
        epoch = progress.step // steps_epoch
        for batches in device_batches(loader, steps_epoch - progress.step % steps_epoch, cfg.train.grad_accum):
            step_lr = set_lr(t.optimizer, cfg, progress.step,
                             max(progress.step / total_steps, seconds / budget_s if budget_s else 0.0))
            train_step(t, batches)
            agree()  # the previous step's flags, read now that this step is queued on the device
            progress.step += 1
            flags.post(progress.step, stop.requested, time.perf_counter() - clock, t.nonfinite_streak)
            window["steps"] += 1
            window["patches"] += micro_batch * cfg.train.grad_accum * info.world_size
            last_step = progress.step >= total_steps or time_up or bool(stopped_by)
            if progress.step % cfg.log.every == 0 or last_step:
                if info.is_main:
                    now = time.perf_counter()
                    n = window["steps"]
                    loss, target, nonfinite = (v.item() for v in (t.loss_sum, t.target_sum, t.nonfinite_total))
                    record = {"step": progress.step, "epoch": progress.step / steps_epoch, "loss": loss / n,
                              "target": target / n, "lr": step_lr, "nonfinite": int(nonfinite),
                              "patches_per_s": window["patches"] / (now - window["t"])}
                    log.write(record)
                    if bar is not None:
                        bar.set_description(f"epoch {epoch}", refresh=False)
                        bar.set_postfix(loss=f"{record['loss']:.4g}", target=f"{record['target']:.4g}",
                                        patches_s=f"{record['patches_per_s']:.0f}", refresh=False)
                    window = {"steps": 0, "patches": 0, "t": now}
                t.reset_window()
            if bar is not None:
                bar.update()
            if last_step:
                break
            if cfg.log.val_every and progress.step % cfg.log.val_every == 0:
                progress.train_seconds = seconds
                if not run_validation():
                    stopped_by = stop.signal or "a signal on another rank"
                    break
            if progress.step % cfg.checkpoint.every == 0:
                progress.train_seconds = seconds
                saver.take(progress)

    # --- the end: the last step's flags, then validate (unless stopped) and save
    agree(write=False)  # the final save below supersedes a pending one
    progress.train_seconds = seconds
    if not stopped_by and not run_validation():
        stopped_by = stop.signal or "a signal on another rank"
    if streak == 0:
        saver.save_now(progress)
    elif info.is_main:  # the last steps were not finite: last.pt keeps the last checkpoint one vouched for
        say(f"the last {streak} steps were not finite: {out_dir / LAST} keeps step {saver.written_step}")
    if bar is not None:
        bar.close()
    if info.is_main:
        log.write({"event": "stopped" if stopped_by else "finished", "step": progress.step, "signal": stopped_by,
                   "nonfinite": int(t.nonfinite_total.item()), "minutes": round(seconds / 60, 2),
                   **({"reason": "max_minutes"} if time_up and not stopped_by else {})})
        log.close()
        if stopped_by:
            say(f"stopped by {stopped_by} at step {progress.step}; {out_dir / LAST} holds step {saver.written_step}. "
                "Start the same command again to resume (a job of launch/slurm/train.sbatch requeues itself).")
    if not stopped_by:
        dist.barrier()  # nobody leaves before the last checkpoint is written
    stop.restore()
    dist.shutdown()
    return {"step": progress.step, "stopped_by": stopped_by, "best_psnr": progress.best_psnr}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = Parser(prog="train.py", description="Train the JPEG artifact removal network "
               "(torchrun --nproc_per_node=N launch/train.py --config configs/X.yaml [key=value ...]).")
    p.add_argument("--config", help="YAML config file (configs/seed.yaml, configs/gpu.yaml, configs/cpu.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=100 data.shards=DIR")
    return p.parse_intermixed_args(argv)  # overrides before and after --config (the SLURM script puts one first)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = parse_args(argv)
        rank = dist.rank_env()[0]
    except (UsageError, dist.LaunchError) as e:
        return fail(PROG, e)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        if rank == 0:  # one line, not one per rank
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except (ConfigError, dist.LaunchError) as e:
        if rank == 0:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        if rank == 0:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except NoTrainingData as e:  # raised in a DataLoader worker: its message carries the worker's traceback
        print(f"{PROG}: error: {str(e).strip().splitlines()[-1].split('NoTrainingData: ')[-1]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; the last checkpoint is kept: run the same command to resume", file=sys.stderr)
        return 130
    return 0
