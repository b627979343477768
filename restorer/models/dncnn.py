"""DnCNN (Zhang et al., "Beyond a Gaussian Denoiser", TIP 2017): a plain stack of 3x3 convolutions
with batch normalisation that predicts the residual (the artifacts) and subtracts it. DnCNN-3, the
paper's blind model for Gaussian noise, super-resolution and JPEG deblocking, has depth 20."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from restorer.base.choices import check_choices
from restorer.models.common import Conditioned, Conditioning, Correction, check_channels


@dataclass
class DnCNNOptions:
    depth: int = 12  # convolution layers, first and last included (the paper: 17, DnCNN-3: 20)
    channels: int = 32  # feature maps (the paper: 64)
    batch_norm: bool = True  # the paper's BN after each middle convolution
    conditioning: Conditioning = "none"  # on the JPEG quality: none | input | decoder | scales (models.common)
    correction: Correction = "steps"  # conditioned: in the input's quantization steps, or plain (models.common)

    def validate(self) -> None:
        check_choices(self)
        if self.depth < 2:
            raise ValueError(f"depth: must be >= 2, got {self.depth}")
        if self.channels < 1:
            raise ValueError(f"channels: must be >= 1, got {self.channels}")


class DnCNN(nn.Module):
    """Conv+ReLU, (depth - 2) x (Conv+BN+ReLU), Conv; output = input - that (residual learning).

    As in the paper, the middle convolutions have no bias (batch normalisation's shift replaces it),
    nor has the last one. The last convolution starts at zero: the network starts as the identity.

    Conditioned on the JPEG quality (`conditioning`): `input` adds FFDNet's level map as an input
    plane; `scales` modulates every layer's features with a FiLM, `decoder` the second half's.
    A conditioned network's correction is in units of its input's quantization step (`correction`).
    """

    Options = DnCNNOptions
    PRESETS = {"cpu": {}, "gpu": {"depth": 20, "channels": 64}}  # gpu: DnCNN-3

    def __init__(self, in_channels: int = 3, **options) -> None:
        super().__init__()
        opts = DnCNNOptions(**options)
        opts.validate()
        c, f = check_channels(in_channels), opts.channels
        self.in_channels, self.options = c, opts
        self.cond = Conditioned(opts.conditioning, opts.correction)
        self.takes_quality = self.cond.takes_quality
        layers: list[nn.Module] = [nn.Conv2d(c + self.cond.extra_planes, f, 3, padding=1), nn.ReLU(inplace=True)]
        places = ["none", "encoder"]  # where each layer's output is modulated (after the ReLUs)
        for i in range(opts.depth - 2):
            layers.append(nn.Conv2d(f, f, 3, padding=1, bias=not opts.batch_norm))
            places.append("none")
            if opts.batch_norm:
                layers.append(nn.BatchNorm2d(f))
                places.append("none")
            layers.append(nn.ReLU(inplace=True))
            places.append("encoder" if i < (opts.depth - 2) // 2 else "decoder")
        layers.append(nn.Conv2d(f, c, 3, padding=1, bias=False))
        places.append("none")
        self.body = nn.Sequential(*layers)
        # a FiLM (or nothing) after each layer; an unconditioned DnCNN keeps the paper's keys exactly
        self.films = nn.ModuleList(self.cond.film(f, p) for p in places) if self.takes_quality else None
        nn.init.zeros_(self.body[-1].weight)

    def forward(self, x: torch.Tensor, quality: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.films is None:
            return x - self.body(x)
        emb = self.cond.embedding(quality)
        y = self.cond.with_planes(x, quality)
        for layer, film in zip(self.body, self.films):
            y = film(layer(y), emb)
        return x - self.cond.correction(y, quality)

    def last_layer(self) -> nn.Module:
        """The output layer: it trains at lr x optim.last_lr_scale (restorer.train.optim)."""
        return self.body[-1]

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, {self.options}"
