"""The optimizer, its parameter groups, the learning-rate schedule and the loss: what a config's
`optim` section builds. Every network declares its output layer (`last_layer()`), which trains at
lr x optim.last_lr_scale (the seed's `last` at half the lr)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from restorer.formats.config import Config, OptimConfig


def psnr_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean over images of 10 log10(MSE): minus their PSNR (NAFNet's PSNRLoss). Every image
    counts by its relative error: a q90 patch, whose error is a hundredth of a q10 patch's, weighs
    as much as it, where a plain MSE would let the network spoil the finely compressed ones."""
    return 10.0 / math.log(10.0) * torch.log((out - y).square().flatten(1).mean(1) + 1e-10).mean()


def loss_fn(o: OptimConfig):
    """optim.loss as a function (output, target) -> scalar."""
    if o.loss == "charbonnier":  # a smooth L1 (Lai et al. 2017); KAIR trains its JPEG SwinIR with it
        eps = o.charbonnier_eps
        return lambda out, y: torch.sqrt((out - y).square() + eps * eps).mean()
    return {"mse_sum": lambda out, y: F.mse_loss(out, y, reduction="sum"), "mse": F.mse_loss, "l1": F.l1_loss,
            "psnr": psnr_loss}[o.loss]


def lr_multiplier(o: OptimConfig, step: int, progress: float) -> float:
    """The schedule: linear warmup over the first steps, then constant, cosine or step decay.
    `progress` (0 to 1) is how far the run is: steps done / total, or time spent / budget."""
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        return o.min_lr_scale + (1 - o.min_lr_scale) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if o.schedule == "step":
        return o.step_gamma ** ((step - o.warmup_steps) // o.step_every)
    return 1.0


def make_optimizer(model: nn.Module, o: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """Two groups: the network's output layer (its `last_layer()`) at lr x last_lr_scale, the rest at
    lr. Fused (one kernel for all parameters) where the device has it: it also skips a non-finite
    step on the device."""
    last_ids = {id(p) for p in model.last_layer().parameters()}
    last = [p for p in model.parameters() if id(p) in last_ids]
    rest = [p for p in model.parameters() if id(p) not in last_ids]
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
    mult = lr_multiplier(cfg.optim, step, progress)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * mult
    return optimizer.param_groups[0]["lr"]
