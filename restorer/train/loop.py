"""The training loop: `Trainer.train()` reads top to bottom (set up, resume, then one loop of
optimizer steps; validation and checkpoints each decide their own cadence), over small parts that
each have one job: the step (`train_step`), the flags all ranks agree on (`StepFlags`), validation,
checkpoints (`Checkpointer`; the format: restorer.formats.checkpoint), the start-up checks
(restorer.train.checks), the optimizer and schedule (restorer.train.optim) and the account of the run
(restorer.train.reporting).

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
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from restorer.formats.run_folder import BEST, CARD, CONFIG, LAST, RUN_MARKER, RunFolder, RunFolderError
from restorer.train import checks
from restorer.cluster import dist
from restorer.formats.checkpoint import (Checkpoint, CheckpointError, best_psnr_on_disk, keep_step_copy, load_latest, read_checkpoint, save_checkpoint)
from restorer.base.cli import Parser, warn
from restorer.base.cli import run as run_tool
from restorer.formats.config import Config, ConfigError, bookkeeping_keys, config_from_dict, dump_config, flatten, load_config
from restorer.train.loader import NoTrainingData, steps_per_epoch, train_loader, val_loader
from restorer.base.errors import RestorerError, RunError, one_line
from restorer.base.device import autocast, to_float
from restorer.infer.metrics import psnr, ssim
from restorer.base.fileio import atomic_open, atomic_write_json
from restorer.base.urls import mask_secrets
from restorer.models import count_parameters, describe, load_weights, macs_per_pixel, relaid
from restorer.train.optim import loss_fn, make_optimizer, set_lr
from restorer.train.reporting import Reporter, Schedule
from restorer.train.trackers import open_trackers
from restorer.train.stop import StopRequest

PROG = "restorer train"


class TrainingError(RunError):
    """The run cannot go on (e.g. the loss keeps diverging); one line for the user."""


class PeerLost(TrainingError):
    """A collective failed: another rank's process or node is gone. Said by every rank that sees it
    (the lost one may be rank 0)."""


def lost_peer(e: BaseException) -> Optional[str]:
    """What a collective's failure says of a lost peer (gloo's "Connection reset by peer", NCCL's
    errors, a DistError), shortened to its point; None for any other error."""
    text = str(e)
    if not (isinstance(e, torch.distributed.DistError) or "/gloo/" in text or "NCCL" in text
            or ("Connection" in text and "peer" in text)):
        return None
    text = text.split("] ", 1)[-1] if text.startswith("[") else text  # "[.../pair.cc:537] Read error ..."
    return one_line(text.split(". This is typically")[0], 160)


# ----------------------------------------------------------------------------- the step


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
            # the convolutions' weights only: nothing else gains from it (a 1 x C x 1 x 1 parameter in channels_last
            # has strides its gradient does not have, which DDP warns of on every rank)
            for module in model.modules():
                if isinstance(module, nn.modules.conv._ConvNd):
                    module.to(memory_format=torch.channels_last)
        ema = copy.deepcopy(model).requires_grad_(False).eval() if cfg.optim.ema else None
        compile_ = cfg.train.compile
        if compile_ and (problem := checks.compile_problem(device.type)):
            warn(f"train.compile: {problem}: running eager")
            compile_ = False
        # compile the module, not the DDP wrapper (DDP then sees the compiled graph's buckets)
        runner = torch.compile(model) if compile_ else model
        ddp = None
        if world_size > 1:
            ddp = DDP(runner, device_ids=[device.index] if device.type == "cuda" else None)
            runner = ddp
        optimizer = make_optimizer(model, cfg.optim, device)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        return cls(cfg, device, model, runner, ddp, optimizer, scaler, ema, loss_fn(cfg.optim),
                   skips_on_device=bool(optimizer.defaults.get("fused")))

    def reset_window(self) -> None:
        self.loss_sum.zero_()
        self.target_sum.zero_()

    def state_dict(self) -> dict:
        """The checkpoint's training fields, as CPU copies (taken now: the device goes on training)."""
        return {"model": _to_cpu(self.model.state_dict()),  # the bare model: no `module.` or `_orig_mod.` prefixes
                "ema": _to_cpu(self.ema.state_dict()) if self.ema is not None else None,
                "optimizer": _to_cpu(self.optimizer.state_dict()), "scaler": self.scaler.state_dict()}

    def start_from(self, weights: dict, source: str) -> None:
        """A fresh run's weights (and its EMA's), another run's or an export's (train.init_from, read by
        checks.init_weights); the optimizer starts fresh."""
        load_weights(self.model, weights, source)
        if self.ema is not None:
            load_weights(self.ema, weights, source)

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's weights, EMA, optimizer and scaler. The config the run is started with applies:
        its lr, schedule and other settings replace the checkpoint's (the optimizer keeps its moments);
        the network cannot change (prepare_run_dir refuses that)."""
        source = "the checkpoint"
        try:
            load_weights(self.model, state["model"], source)
            if self.ema is not None:
                # EMA switched on at resume starts from the resumed weights, not the random initial ones
                load_weights(self.ema, state.get("ema") if state.get("ema") is not None else state["model"], source)
        except ValueError as e:  # weights that do not fit the network the file names
            raise TrainingError(str(e)) from None
        if state.get("optimizer") is not None:  # (a file of weights alone: a fresh optimizer)
            base_lrs = [g["base_lr"] for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(state["optimizer"])
            for group, base_lr in zip(self.optimizer.param_groups, base_lrs):
                group["base_lr"] = base_lr  # from this run's config, not the checkpoint's
                group.update({k: v for k, v in self.optimizer.defaults.items() if k != "lr"})
            for param, moments in self.optimizer.state.items():  # saved in an earlier layout (load_weights)
                moments.update({k: relaid(v, param.shape) for k, v in moments.items() if k != "step"})
        if self.scaler.is_enabled() and state.get("scaler"):  # fp16 now but not then: a fresh scaler
            self.scaler.load_state_dict(state["scaler"])


def train_step(t: Training, batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """One optimizer step over `batches` (grad_accum micro-batches of uint8 inputs and targets, and
    the inputs' JPEG qualities), gradients synchronised on the last only. Never reads a value back
    from the device: a non-finite gradient (identical on every rank after DDP's all-reduce) skips
    the update on the device and counts in `t.nonfinite_streak`."""
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


@dataclass
class Validation:
    metrics: dict  # val_psnr, val_psnr_jpeg, val_ssim, val_ssim_jpeg, val_images, val_psnr_q30, ...
    sample: Optional[tuple]  # this rank's first image at the first quality: (JPEG, network, original) uint8 HWC


@torch.no_grad()
def validate(model: nn.Module, cfg: Config, info: dist.DistInfo, stop: StopRequest) -> Optional[Validation]:
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
    stopped, sample = False, None
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
        if sample is None and i == 0 and cfg.log.pictures and info.is_main:  # the picture's: one read, once
            sample = tuple((t[0].permute(1, 2, 0) * 255).round().to(torch.uint8).squeeze(-1).cpu().numpy()
                           for t in (x, out, y))
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
    return Validation(out, sample)


# ----------------------------------------------------------------------------- checkpoints and resume


@dataclass
class RunState:
    """Where the run is: what a checkpoint records besides the weights (step, best PSNR, training
    time, the world it ran in and its global batch), and what the ranks agreed after the last step
    (the time, a run of non-finite steps, a stop signal, the budget spent)."""

    steps_per_epoch: int = 1
    world_size: int = 1
    global_batch: int = 0  # patches a step: world size x batch_size x grad_accum, kept across resumes
    step: int = 0
    best_psnr: float = -math.inf
    train_seconds: float = 0.0  # training time so far, resumed runs included: the slowest rank's clock
    streak: int = 0  # non-finite steps in a row
    stopped_by: Optional[str] = None  # the signal that stopped the run
    time_up: bool = False  # train.max_minutes spent

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.step // self.steps_per_epoch, "best_psnr": self.best_psnr,
                "train_seconds": self.train_seconds, "world_size": self.world_size, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best_psnr, self.train_seconds = state["step"], state["best_psnr"], state["train_seconds"]


class Generators:
    """The random generators a training step may draw from: torch's, and each CUDA device's (the
    data stream draws from none: its randomness is a function of integers, restorer.data.stream)."""

    def state_dict(self) -> dict:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return {"rng": {"torch": torch.get_rng_state(), "cuda": cuda}}

    def load_state_dict(self, state: dict) -> None:
        rng = state.get("rng")
        if rng is None:  # (a file of weights alone)
            return
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])


def _to_cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """'key old -> new' for each setting that differs from the checkpoint's config."""
    try:
        old = flatten(config_from_dict(saved).to_dict())
    except ConfigError:  # a checkpoint of another restorer version: compare what can be compared
        old = flatten(saved)
    new = flatten(cfg.to_dict())
    ignored = bookkeeping_keys() | {"train.init_from"}  # (a resume does not read init_from)
    return [mask_secrets(f"{k} {old.get(k)!r} -> {new[k]!r}") for k in new if k not in ignored and old.get(k) != new[k]]


def prepare_run_dir(cfg: Config, info: dist.DistInfo) -> Optional[Checkpoint]:
    """Rank 0 decides whether the run resumes (and from which file) and everyone gets its decision:
    the checkpoint, None to start fresh, or the same error on every rank. A rank that cannot see the
    run folder (node-local disk, a stale NFS cache) still resumes with the rest.

    Rank 0 then claims the folder before anything is written there (restorer.formats.run_folder.RunFolder):
    the trainer deletes only names a run of it recorded as its own. A fresh start in a folder of a
    run that never reached a checkpoint (a requeue, a crash) replaces that run's recorded files;
    with train.resume=false it needs train.overwrite=true to delete a recorded run. A run's name
    that no run recorded (a user's config.yaml, a val/ of photos, a run from before the record) is
    refused in one line, train.overwrite or not: the user moves it or picks another train.out_dir.
    Other files (a user's notes.txt) are no obstacle: a run only adds its own names."""
    decision: tuple[Optional[Checkpoint], Optional[RestorerError]] = (None, None)  # checkpoint, error
    if info.is_main:
        out_dir = Path(cfg.train.out_dir)
        try:
            folder = RunFolder.read(out_dir)
            found = load_latest(out_dir) if cfg.train.resume else None
            if found is not None:
                if found.network != cfg.network():
                    raise TrainingError(f"{found.path} is a {found.network} checkpoint, not {cfg.network()}: use "
                                        "another train.out_dir, or train.resume=false train.overwrite=true")
                best = best_psnr_on_disk(out_dir)  # best.pt's own figure: last.pt is written after it
                if best is not None:
                    found.best_psnr = max(found.best_psnr, best)
                decision = (found, None)
            elif theirs := folder.theirs():
                raise RunFolderError(f"{out_dir} holds {_some_names(theirs)}, which no run of this trainer recorded "
                                     f"as its own ({RUN_MARKER}): it deletes or writes over none of them, "
                                     "train.overwrite or not; use another train.out_dir, or move them away")
            elif ours := folder.ours():
                if cfg.train.resume:
                    # an attempt that died before its first checkpoint (a requeue, a crash): nothing to
                    # resume and nothing worth keeping; its start again replaces its files
                    print(f"{PROG}: no checkpoint in {out_dir} yet: starting at step 0 (replacing "
                          f"{_some_names(ours)})", file=sys.stderr, flush=True)
                elif not cfg.train.overwrite:
                    raise TrainingError(f"{out_dir} holds another run ({_some_names(ours)}) and train.resume=false: "
                                        "set train.overwrite=true to delete it, or use another train.out_dir")
                folder.remove_ours()
            folder.claim()
            folder.remove_stale_temp_files()
        except RunFolderError as e:  # the user's folder: bad input
            decision = (None, e)
        except (TrainingError, CheckpointError, OSError) as e:
            decision = (None, TrainingError(str(e)))
    checkpoint, error = dist.broadcast(decision)
    if error is not None:
        raise error
    return checkpoint


def _some_names(paths: list[Path], shown: int = 4) -> str:
    """'config.yaml, val/, ...': a few of a folder's names, folders marked, for a one-line message."""
    names = [p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in paths]
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def kept_accumulation(checkpoint: Checkpoint, world_size: int, batch_size: int, grad_accum: int) -> int:
    """The grad_accum that keeps the run's global batch (world size x batch_size x grad_accum, what the
    checkpoint recorded) in a world of `world_size` ranks: the data stream, the epoch, the schedule and
    the gradient's scale all follow it. ConfigError (one line, with values that work) where none can."""
    kept = checkpoint.global_batch
    if not kept or world_size * batch_size * grad_accum == kept:  # (a checkpoint that did not record it)
        return grad_accum
    if kept % (world_size * batch_size) == 0:
        return kept // (world_size * batch_size)
    was = f"the run's global batch is {kept} patches a step ({checkpoint.world_size} rank(s) x batch_size x grad_accum)"
    if kept % world_size:
        ranks = [n for n in range(1, kept + 1) if kept % n == 0]
        raise ConfigError(f"{was}: {world_size} ranks cannot share it; run it on {', '.join(map(str, ranks))} ranks")
    share = kept // world_size
    sizes = [b for b in range(1, share + 1) if share % b == 0][-4:]
    raise ConfigError(f"{was}: on {world_size} rank(s) train.batch_size={batch_size} cannot make it; "
                        + ", ".join(f"train.batch_size={b} train.grad_accum={share // b}" for b in sizes) + " can")


class Checkpointer:
    """Rank 0's checkpoint writes. A periodic checkpoint is taken at its step but written only once
    the next step's gradients are known to be finite: weights that a bad update blew up never
    reach last.pt (nor push a good step copy out of `checkpoint.keep`)."""

    def __init__(self, t: Training, info: dist.DistInfo, stop: StopRequest, parts: Sequence):
        self.t, self.info, self.stop, self.parts = t, info, stop, parts  # parts: what a checkpoint holds (Stateful)
        self.out_dir = Path(t.cfg.train.out_dir)
        self.folder = RunFolder.read(self.out_dir) if info.is_main else None  # claimed by prepare_run_dir
        self.pending: list[Checkpoint] = []  # taken, not yet written
        self.written_step: Optional[int] = None

    def due(self, step: int) -> bool:
        return step % self.t.cfg.checkpoint.every == 0

    def checkpoint(self) -> Checkpoint:
        """Everything a run needs to go on, taken now (CPU copies: the device goes on training)."""
        return Checkpoint.of(self.t.cfg.network(), self.t.cfg.to_dict(), self.parts)

    def take(self) -> None:
        if self.info.is_main:
            self.pending.append(self.checkpoint())

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

    def save_now(self, step: int, name: str = LAST) -> None:
        if self.info.is_main and not (name == LAST and self.written_step == step):
            self._write(self.checkpoint(), name)

    def _write(self, checkpoint: Checkpoint, name: str) -> None:
        try:
            with self.stop.saving():
                save_checkpoint(self.out_dir / name, checkpoint)
                if name == LAST:
                    self.written_step = checkpoint.step
                    if self.t.cfg.checkpoint.keep:
                        keep_step_copy(self.folder, checkpoint.step, self.t.cfg.checkpoint.keep)
        except OSError as e:
            raise TrainingError(f"cannot write a checkpoint in {self.out_dir}: {e.strerror or e} "
                                f"({e.filename or name})") from None


# ----------------------------------------------------------------------------- the run


def device_batches(loader, steps: int, grad_accum: int) -> Iterator[list]:
    """One epoch of the loader as lists of grad_accum micro-batches."""
    batches = iter(loader)
    for _ in range(steps):
        yield [next(batches) for _ in range(grad_accum)]


class Trainer:
    """One run: everything is set up in __init__ (process group, checks, network, resume, loader,
    reporter, checkpoints); `train()` is the loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.info = info = dist.init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
        torch.manual_seed(cfg.train.seed)
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the training shapes are fixed: pick the fastest kernels once
        self.stop = StopRequest(cfg.train.stop_grace_s)
        self.nodes = dist.gather(dist.node_name())  # each rank's node, in rank order
        self.stop.peers = self.peers()
        checks.start_checks(cfg, info)

        self.t = Training.build(cfg, info.device, info.world_size)
        checkpoint = prepare_run_dir(cfg, info)
        notes = []
        if checkpoint is not None:
            accum = kept_accumulation(checkpoint, info.world_size, cfg.train.batch_size, cfg.train.grad_accum)
            if accum != cfg.train.grad_accum or checkpoint.world_size != info.world_size:
                notes.append(f"world size {checkpoint.world_size} -> {info.world_size}: the global batch of "
                             f"{checkpoint.global_batch} patches a step is kept (train.grad_accum "
                             f"{cfg.train.grad_accum} -> {accum}): the same samples, the same schedule")
                cfg.train.grad_accum = accum
        global_batch = cfg.train.batch_size * cfg.train.grad_accum * info.world_size
        self.steps_epoch = steps_per_epoch(cfg.data, cfg.train.batch_size, info.world_size, cfg.train.grad_accum)
        self.state = RunState(self.steps_epoch, info.world_size, global_batch)
        self.generators = Generators()
        self.loader = train_loader(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed, rank=info.rank,
                                   world_size=info.world_size, grad_accum=cfg.train.grad_accum,
                                   step=checkpoint.step if checkpoint is not None else 0,
                                   steps=self.steps_epoch).on(info.device)
        parts = (self.t, self.state, self.generators, self.loader)
        if checkpoint is not None:
            checkpoint.load_into(parts)
        elif cfg.train.init_from:  # a fresh run: every rank reads it, and it is this network (agreed), or one line
            read: list[dict] = []
            checks.agreed_check(info, lambda: read.append(checks.init_weights(cfg)))
            self.t.start_from(read[0], cfg.train.init_from)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_epoch
        self.budget_s = cfg.train.max_minutes * 60
        self.state.time_up = bool(self.budget_s) and self.state.train_seconds >= self.budget_s  # spent before a resume
        out_dir = Path(cfg.train.out_dir)
        if info.is_main:
            with atomic_open(out_dir / CONFIG, "w") as f:
                f.write(dump_config(cfg))
        trackers = open_trackers(cfg.log, out_dir, cfg.to_dict(), {
            "name": cfg.model.name, "options": cfg.model.options(), "parameters": count_parameters(self.t.model),
            "macs_per_pixel": macs_per_pixel(self.t.model, self.t.model.in_channels)}) if info.is_main else []
        schedule = Schedule(self.total_steps, self.steps_epoch, self.budget_s, self.state.step, self.state.train_seconds)
        self.report = Reporter(out_dir, cfg.log, schedule, active=info.is_main, trackers=trackers)
        self.announce(checkpoint, notes, global_batch)
        del checkpoint  # its tensors: the model and optimizer hold their own now
        self.saver = Checkpointer(self.t, info, self.stop, parts)
        self.flags = StepFlags(info.device)
        self.clock = time.perf_counter() - self.state.train_seconds

    def announce(self, checkpoint: Optional[Checkpoint], notes: list[str], global_batch: int) -> None:
        """The run's first lines: the network, where it starts (a resume and what changed since, or the
        weights it starts from), and the start or resume event in metrics.jsonl."""
        cfg, info = self.cfg, self.info
        self.report.say(f"network {describe(self.t.model, cfg.model.name)}")
        start = {"event": "resume" if checkpoint is not None else "start", "step": self.state.step,
                 "world_size": info.world_size, "global_batch": global_batch, "nodes": self.nodes,
                 "steps_per_epoch": self.steps_epoch, "total_steps": self.total_steps}
        if checkpoint is not None:
            changes = config_changes(checkpoint.config, cfg)
            self.report.say(f"resuming from {checkpoint.path} at step {self.state.step}"
                            + "".join(f"; {note}" for note in notes)
                            + (f"; settings changed since, applied now: {'; '.join(changes)}" if changes else ""))
            start.update(checkpoint=str(checkpoint.path), changes=changes)
        elif cfg.train.init_from:
            self.report.say(f"starting from the weights of {cfg.train.init_from}")
            start.update(init_from=cfg.train.init_from)
        self.report.write(start)

    def peers(self) -> str:
        """The other ranks, by node: what a lost connection may be."""
        here = self.nodes[self.info.rank]
        others = {}
        for rank, node in enumerate(self.nodes):
            if rank != self.info.rank:
                others.setdefault(node, []).append(rank)
        text = "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))} on "
                         f"{'this node' if node == here else 'node ' + node}" for node, r in others.items())
        return text or "none"

    def running(self) -> bool:
        s = self.state
        return s.step < self.total_steps and not s.stopped_by and not s.time_up

    def train(self) -> dict:
        try:
            return self._train()
        except RuntimeError as e:  # a collective that failed: a peer process or node is gone
            why = lost_peer(e)
            if why is None:
                raise
            self.stop.said = True  # the line below is the run's last word; the watchdog need not add one
            raise PeerLost(f"lost the other ranks ({self.peers()}): {why}; {LAST} holds the last checkpoint: start "
                           "the same command again to resume") from None

    def _train(self) -> dict:
        self.t.model.train()
        while self.running():
            left = self.steps_epoch - self.state.step % self.steps_epoch
            for batches in device_batches(self.loader, left, self.cfg.train.grad_accum):
                self.step(batches)
                if not self.running():
                    break
                if self.validation_due() and not self.validate():
                    break  # a stop signal cut the validation short
                if self.saver.due(self.state.step):
                    self.saver.take()
        return self.finish()

    def step(self, batches: list) -> None:
        cfg, s = self.cfg, self.state
        progress = max(s.step / self.total_steps, s.train_seconds / self.budget_s if self.budget_s else 0.0)
        lr = set_lr(self.t.optimizer, cfg, s.step, progress)
        train_step(self.t, batches)
        self.agree()  # the previous step's flags, read now that this step is queued on the device
        s.step += 1
        if cfg.data.trace:
            self.report.trace(s.step, self.traced())
        self.flags.post(s.step, self.stop.requested, time.perf_counter() - self.clock, self.t.nonfinite_streak)
        if self.report.due(s.step, last=not self.running()):
            if self.info.is_main:  # the one read of the device's counters, every log.every steps
                n = max(s.step - self.report.window[0], 1)
                loss, target, nonfinite = (v.item() for v in (self.t.loss_sum, self.t.target_sum, self.t.nonfinite_total))
                self.report.training(s.step, {"loss": loss / n, "target": target / n, "lr": lr,
                                              "nonfinite": int(nonfinite)},
                                     cfg.train.batch_size * cfg.train.grad_accum * self.info.world_size)
            self.t.reset_window()
        self.report.advance(s.step, s.train_seconds)

    def traced(self) -> list[list[int]]:
        """The step's (image, patch) of every slot of the global batch, in slot order: every rank's
        numbers, gathered (data.trace: a collective a step)."""
        mine = np.concatenate(self.loader.take_traced())
        rows = sorted(row for part in dist.gather(mine.tolist()) for row in part)
        return [row[1:] for row in rows]

    def agree(self, write: bool = True) -> None:
        """Act on the last step's agreed flags: settle checkpoints, stop on divergence or a signal."""
        agreed = self.flags.read()
        if agreed is None:
            return
        s = self.state
        s.train_seconds, s.streak = agreed.seconds, agreed.streak
        self.saver.settle(agreed, write)
        if s.streak >= self.cfg.train.max_nonfinite:
            raise TrainingError(f"{s.streak} non-finite steps in a row at step {agreed.step}: lower optim.lr, set "
                                f"optim.grad_clip, or use precision fp32/bf16; {LAST} keeps the last good weights")
        if agreed.stop and not s.stopped_by:
            s.stopped_by = self.stop.signal or "a signal on another rank"
        s.time_up = bool(self.budget_s) and s.train_seconds >= self.budget_s

    def validation_due(self) -> bool:
        return bool(self.cfg.log.val_every) and self.state.step % self.cfg.log.val_every == 0

    def validate(self) -> bool:
        """Validate (all ranks), report, save best.pt; False if a stop signal cut it short."""
        s = self.state
        self.report.validating(s.step)
        result = validate(self.t.ema if self.t.ema is not None else self.t.model, self.cfg, self.info, self.stop)
        if result is None:
            s.stopped_by = self.stop.signal or "a signal on another rank"
            return False
        metrics = result.metrics
        better = metrics["val_images"] > 0 and metrics["val_psnr"] > s.best_psnr
        if better:
            s.best_psnr = metrics["val_psnr"]
        self.report.validation(s.step, metrics)
        if result.sample is not None:
            self.report.picture(s.step, *result.sample)
        if better:
            self.saver.save_now(s.step, BEST)
        return True

    def finish(self) -> dict:
        """The last step's flags, a last validation (unless stopped), the last save; every rank leaves
        together after it."""
        s = self.state
        self.agree(write=False)  # the final save below supersedes a pending one
        if not s.stopped_by:
            self.validate()
        if s.streak == 0:
            self.saver.save_now(s.step)
        else:  # the last steps were not finite: last.pt keeps the last checkpoint one vouched for
            self.report.say(f"the last {s.streak} steps were not finite: {self.saver.out_dir / LAST} keeps step "
                            f"{self.saver.written_step}")
        self.report.write({"event": "stopped" if s.stopped_by else "finished", "step": s.step, "signal": s.stopped_by,
                           "nonfinite": int(self.t.nonfinite_total.item()), "minutes": round(s.train_seconds / 60, 2),
                           **({"reason": "max_minutes"} if s.time_up and not s.stopped_by else {})})
        if self.info.is_main and self.report.trackers and (self.saver.out_dir / BEST).is_file():
            card = self.saver.out_dir / CARD  # the best checkpoint's card, for the trackers
            atomic_write_json(card, read_checkpoint(self.saver.out_dir / BEST).card())
            self.report.artifact(card)
        self.report.close()
        if s.stopped_by:
            self.report.say(f"stopped by {s.stopped_by} at step {s.step}; {self.saver.out_dir / LAST} holds step "
                            f"{self.saver.written_step}. Start the same command again to resume (a job of "
                            "launch/slurm/train.sbatch requeues itself).")
        else:
            dist.barrier()  # nobody leaves before the last checkpoint is written
        self.stop.restore()
        dist.shutdown()
        return {"step": s.step, "stopped_by": s.stopped_by, "best_psnr": s.best_psnr}


def train(cfg: Config) -> dict:
    return Trainer(cfg).train()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = Parser(prog=PROG, description="Train the JPEG artifact removal network "
               "(torchrun --nproc_per_node=N launch/train.py --config configs/X.yaml [key=value ...]).")
    p.add_argument("--config", help="YAML config file (configs/seed.yaml, configs/gpu.yaml, configs/cpu.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=100 data.shards=DIR")
    return p.parse_intermixed_args(argv)  # overrides before and after --config (the SLURM script puts one first)


def main(argv: Optional[list[str]] = None) -> int:
    rank = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)

    def body() -> int:
        args = parse_args(argv)
        dist.rank_env()  # refuses a launch that cannot work (LaunchError) before the config is read
        train(load_config(args.config, args.overrides))
        return 0

    # the config, the launch and the run's agreed failures are the same on every rank: rank 0 says them;
    # a rank's own failures (its loader found no image, it lost its peers) are said by that rank
    return run_tool(PROG, body, quiet=lambda e: rank != 0 and not isinstance(e, (NoTrainingData, PeerLost)),
                    interrupted="interrupted; the last checkpoint is kept: run the same command to resume")
