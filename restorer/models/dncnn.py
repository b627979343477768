"""DnCNN (Zhang et al., "Beyond a Gaussian Denoiser", TIP 2017): a plain stack of 3x3 convolutions
with batch normalisation that predicts the residual (the artifacts) and subtracts it. DnCNN-3, the
paper's blind model for Gaussian noise, super-resolution and JPEG deblocking, has depth 20."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from restorer.models.common import check_channels


@dataclass
class DnCNNOptions:
    depth: int = 12  # convolution layers, first and last included (the paper: 17, DnCNN-3: 20)
    channels: int = 32  # feature maps (the paper: 64)
    batch_norm: bool = True  # the paper's BN after each middle convolution

    def validate(self) -> None:
        if self.depth < 2:
            raise ValueError(f"depth must be >= 2, got {self.depth}")
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")


class DnCNN(nn.Module):
    """Conv+ReLU, (depth - 2) x (Conv+BN+ReLU), Conv; output = input - that (residual learning).

    As in the paper, the middle convolutions have no bias (batch normalisation's shift replaces it),
    nor has the last one. The last convolution starts at zero: the network starts as the identity.
    """

    Options = DnCNNOptions
    PRESETS = {"cpu": {}, "gpu": {"depth": 20, "channels": 64}}  # gpu: DnCNN-3

    def __init__(self, in_channels: int = 3, **options) -> None:
        super().__init__()
        opts = DnCNNOptions(**options)
        opts.validate()
        c, f = check_channels(in_channels), opts.channels
        self.in_channels, self.options = c, opts
        layers: list[nn.Module] = [nn.Conv2d(c, f, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(opts.depth - 2):
            layers.append(nn.Conv2d(f, f, 3, padding=1, bias=not opts.batch_norm))
            if opts.batch_norm:
                layers.append(nn.BatchNorm2d(f))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Conv2d(f, c, 3, padding=1, bias=False))
        self.body = nn.Sequential(*layers)
        nn.init.zeros_(self.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, {self.options}"
