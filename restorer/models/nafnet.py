"""NAFNet (Chen et al., "Simple Baselines for Image Restoration", ECCV 2022): a U-Net of blocks with
no nonlinear activation: LayerNorm, 1x1 and depthwise 3x3 convolutions, SimpleGate (a product of
two channel halves) and simplified channel attention, each branch scaled by a learned factor that
starts at zero."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from restorer.base.choices import check_choices
from restorer.models.common import Conditioned, Conditioning, Correction, check_channels, pad_to_multiple


@dataclass
class NAFNetOptions:
    width: int = 16  # channels at full resolution, doubled at each scale
    enc_blocks: tuple[int, ...] = (1, 1, 1, 1)  # NAFBlocks per encoder scale (its length sets the scales)
    middle_blocks: int = 1
    dec_blocks: tuple[int, ...] = (1, 1, 1, 1)  # per decoder scale, deepest first; as long as enc_blocks
    conditioning: Conditioning = "none"  # on the JPEG quality: none | input | decoder | scales (models.common)
    correction: Correction = "steps"  # conditioned: in the input's quantization steps, or plain (models.common)

    def validate(self) -> None:
        check_choices(self)
        if self.width < 1 or self.width % 2:
            raise ValueError(f"width: must be a positive even number, got {self.width}")
        if len(self.enc_blocks) != len(self.dec_blocks) or not 1 <= len(self.enc_blocks) <= 6:
            raise ValueError(f"dec_blocks: must have as many scales as enc_blocks (1 to 6), got "
                             f"{list(self.enc_blocks)} and {list(self.dec_blocks)}")
        if min(*self.enc_blocks, *self.dec_blocks, self.middle_blocks) < 0:
            raise ValueError(f"enc_blocks, middle_blocks, dec_blocks: must be >= 0, got {list(self.enc_blocks)}, "
                             f"{self.middle_blocks}, {list(self.dec_blocks)}")


def per_channel(p: torch.Tensor) -> torch.Tensor:
    """A C-vector as 1 x C x 1 x 1. The scales are stored as C-vectors: with 1 x C x 1 x 1 parameters
    torch 2.11's compiled backward (CUDA, bf16, channels_last) returned C-vector gradients and failed
    the first step ("invalid gradient ... got [32] but expected shape compatible with [1, 32, 1, 1]").
    States of the earlier layout load (restorer.models.load_weights reshapes them)."""
    return p.view(1, -1, 1, 1)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of N x C x H x W, with a per-channel scale and shift."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return (x - mu) * torch.rsqrt(var + self.eps) * per_channel(self.weight) + per_channel(self.bias)


class SimpleGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """y = x + beta * conv(SCA(SG(dwconv(conv(LN(x)))))); out = y + gamma * conv(SG(conv(LN(y)))).
    Expansion 2 in both branches, as in the paper; beta and gamma start at zero (the block starts
    as the identity)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(c)
        self.conv1 = nn.Conv2d(c, 2 * c, 1)
        self.conv2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.sg = SimpleGate()
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1))
        self.conv3 = nn.Conv2d(c, c, 1)
        self.norm2 = LayerNorm2d(c)
        self.conv4 = nn.Conv2d(c, 2 * c, 1)
        self.conv5 = nn.Conv2d(c, c, 1)
        self.beta = nn.Parameter(torch.zeros(c))
        self.gamma = nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.sg(self.conv2(self.conv1(self.norm1(x))))
        y = x + self.conv3(t * self.sca(t)) * per_channel(self.beta)
        return y + self.conv5(self.sg(self.conv4(self.norm2(y)))) * per_channel(self.gamma)


class NAFNet(nn.Module):
    """intro 3x3 -> [NAFBlocks, 2x2 stride-2 conv doubling the channels] per scale -> NAFBlocks ->
    [1x1 conv + PixelShuffle(2) halving them, plus the encoder's output, NAFBlocks] per scale ->
    ending 3x3; output = input + ending. The ending convolution starts at zero (the paper's does
    not): the network starts as the identity. Any H x W: padded inside to a multiple of 2^scales.

    Conditioned on the JPEG quality (`conditioning`): `input` adds a level plane to the intro's input;
    `decoder` (FBCNN's) and `scales` modulate each scale's blocks' output with a FiLM.
    A conditioned network's correction is in units of its input's quantization step (`correction`).
    """

    Options = NAFNetOptions
    # gpu: the paper's SIDD denoising model NAFNet-width32 (29.16 M parameters)
    PRESETS = {"cpu": {}, "gpu": {"width": 32, "enc_blocks": [2, 2, 4, 8], "middle_blocks": 12,
                                  "dec_blocks": [2, 2, 2, 2]}}

    def __init__(self, in_channels: int = 3, **options) -> None:
        super().__init__()
        opts = NAFNetOptions(**options)
        opts.enc_blocks, opts.dec_blocks = tuple(opts.enc_blocks), tuple(opts.dec_blocks)
        opts.validate()
        c, chan = check_channels(in_channels), opts.width
        self.in_channels, self.options = c, opts
        self.multiple = 2 ** len(opts.enc_blocks)
        self.cond = Conditioned(opts.conditioning, opts.correction)
        self.takes_quality = self.cond.takes_quality
        self.intro = nn.Conv2d(c + self.cond.extra_planes, chan, 3, padding=1)
        self.encoders, self.downs, self.enc_films = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for n in opts.enc_blocks:
            self.encoders.append(nn.Sequential(*(NAFBlock(chan) for _ in range(n))))
            self.enc_films.append(self.cond.film(chan, "encoder"))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, stride=2))
            chan *= 2
        self.middle = nn.Sequential(*(NAFBlock(chan) for _ in range(opts.middle_blocks)))
        self.mid_film = self.cond.film(chan, "middle")
        self.ups, self.decoders, self.dec_films = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for n in opts.dec_blocks:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, 2 * chan, 1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(nn.Sequential(*(NAFBlock(chan) for _ in range(n))))
            self.dec_films.append(self.cond.film(chan, "decoder"))
        self.ending = nn.Conv2d(chan, c, 3, padding=1)
        nn.init.zeros_(self.ending.weight)
        nn.init.zeros_(self.ending.bias)

    def forward(self, x: torch.Tensor, quality: Optional[torch.Tensor] = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        inp = pad_to_multiple(x, self.multiple)
        emb = self.cond.embedding(quality)
        y = self.intro(self.cond.with_planes(inp, quality))
        skips: list[torch.Tensor] = []
        for encoder, film, down in zip(self.encoders, self.enc_films, self.downs):
            y = film(encoder(y), emb)
            skips.append(y)
            y = down(y)
        y = self.mid_film(self.middle(y), emb)
        for i, (decoder, film, up) in enumerate(zip(self.decoders, self.dec_films, self.ups)):  # (TorchScript compiles this)
            y = film(decoder(up(y) + skips[len(skips) - 1 - i]), emb)
        return (inp + self.cond.correction(self.ending(y), quality))[..., :h, :w]

    def last_layer(self) -> nn.Module:
        """The output layer: it trains at lr x optim.last_lr_scale (restorer.train.optim)."""
        return self.ending

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, {self.options}"
