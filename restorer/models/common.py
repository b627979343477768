"""Pieces the networks share: padding to the multiple a U-Net needs, and counting what a network costs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom and right of N x C x H x W to multiples of `multiple` by replicating the edge
    (a U-Net halves H and W per scale; the caller crops the output back to H x W). Replication, not
    zeros: no artificial edge for the network to restore. No branch on the size: the same graph for
    every H and W, so ONNX and torch.export keep them dynamic."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % multiple, 0, -h % multiple), mode="replicate")


def check_channels(in_channels) -> int:
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    return in_channels


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def macs_per_pixel(model: nn.Module, in_channels: int, size: int = 64) -> float:
    """Multiply-accumulates of the convolutions per input pixel, measured on one size x size image.

    Convolutions are where the work is; normalisation, activations and pooling add a few percent
    (counted by some tools, not here). A transposed convolution costs in_pixels x C_out x k x k.
    """
    total = 0

    def count(module: nn.Module, inputs, output) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        if isinstance(module, nn.ConvTranspose2d):
            total += inputs[0][0].numel() * module.out_channels // module.groups * k
        else:
            total += output[0].numel() * module.in_channels // module.groups * k

    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    hooks = [m.register_forward_hook(count) for m in convs]
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        model(torch.zeros(1, in_channels, size, size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total / (size * size)
