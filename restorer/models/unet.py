"""A residual U-Net in the style of DRUNet (Zhang et al., "Plug-and-Play Image Restoration with Deep
Denoiser Prior", TPAMI 2021) and FBCNN (Jiang et al., ICCV 2021, built on it for JPEG artifacts):
scales joined by strided-convolution downsampling and transposed-convolution upsampling, residual
blocks at each scale, additive skips, and a global residual."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from restorer.base.choices import check_choices
from restorer.models.common import Conditioned, Conditioning, Correction, check_channels, pad_to_multiple


@dataclass
class UNetOptions:
    widths: tuple[int, ...] = (16, 32, 64, 128)  # channels per scale, full resolution first (DRUNet: 64..512)
    blocks: int = 1  # residual blocks per scale, in the encoder, the middle and the decoder (DRUNet: 4)
    conditioning: Conditioning = "none"  # on the JPEG quality: none | input | decoder | scales (models.common)
    correction: Correction = "steps"  # conditioned: in the input's quantization steps, or plain (models.common)

    def validate(self) -> None:
        check_choices(self)
        if not 2 <= len(self.widths) <= 6 or any(w < 1 for w in self.widths):
            raise ValueError(f"widths: must be 2 to 6 positive channel counts, got {list(self.widths)}")
        if self.blocks < 0:
            raise ValueError(f"blocks: must be >= 0, got {self.blocks}")


class ResBlock(nn.Module):
    """x + conv(relu(conv(x))): DRUNet's residual block (3x3 convolutions, no bias)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class UNet(nn.Module):
    """head -> [blocks, 2x2 stride-2 conv] per scale -> blocks -> [2x2 stride-2 transposed conv,
    blocks] per scale, each decoder scale's input plus the encoder's output at that scale -> tail;
    output = input + tail. With widths (64, 128, 256, 512) and 4 blocks it is DRUNet layer for layer
    (less DRUNet's noise-level input channel, plus the global residual). The tail starts at zero:
    the network starts as the identity. Any H x W: padded inside to a multiple of 2^(scales-1).

    Conditioned on the JPEG quality (`conditioning`): `input` adds DRUNet's level map as a plane of
    the head's input; `decoder` (FBCNN's) and `scales` modulate each scale's output with a FiLM.
    A conditioned network's correction is in units of its input's quantization step (`correction`).
    """

    Options = UNetOptions
    PRESETS = {"cpu": {}, "gpu": {"widths": [64, 128, 256, 512], "blocks": 4}}  # gpu: DRUNet's

    def __init__(self, in_channels: int = 3, **options) -> None:
        super().__init__()
        opts = UNetOptions(**options)
        opts.widths = tuple(opts.widths)
        opts.validate()
        c, w = check_channels(in_channels), opts.widths
        self.in_channels, self.options = c, opts
        self.multiple = 2 ** (len(w) - 1)
        self.cond = Conditioned(opts.conditioning, opts.correction)
        self.takes_quality = self.cond.takes_quality

        def blocks(ch: int) -> list[nn.Module]:
            return [ResBlock(ch) for _ in range(opts.blocks)]

        self.head = nn.Conv2d(c + self.cond.extra_planes, w[0], 3, padding=1, bias=False)
        self.downs = nn.ModuleList(nn.Sequential(*blocks(w[i]), nn.Conv2d(w[i], w[i + 1], 2, stride=2, bias=False))
                                   for i in range(len(w) - 1))
        self.body = nn.Sequential(*blocks(w[-1]))
        self.ups = nn.ModuleList(nn.Sequential(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2, bias=False), *blocks(w[i]))
                                 for i in reversed(range(len(w) - 1)))  # deepest first, the order they run in
        self.tail = nn.Conv2d(w[0], c, 3, padding=1, bias=False)
        nn.init.zeros_(self.tail.weight)
        self.enc_films = nn.ModuleList(self.cond.film(w[i + 1], "encoder") for i in range(len(w) - 1))
        self.mid_film = self.cond.film(w[-1], "middle")
        self.dec_films = nn.ModuleList(self.cond.film(w[i], "decoder") for i in reversed(range(len(w) - 1)))

    def forward(self, x: torch.Tensor, quality: Optional[torch.Tensor] = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        inp = pad_to_multiple(x, self.multiple)
        emb = self.cond.embedding(quality)
        skips = [self.head(self.cond.with_planes(inp, quality))]
        for down, film in zip(self.downs, self.enc_films):
            skips.append(film(down(skips[-1]), emb))
        y = self.mid_film(self.body(skips[-1]), emb)
        for i, (up, film) in enumerate(zip(self.ups, self.dec_films)):  # (indices: TorchScript compiles this)
            y = film(up(y + skips[len(skips) - 1 - i]), emb)
        y = self.cond.correction(self.tail(y + skips[0]), quality)
        return (inp + y)[..., :h, :w]

    def last_layer(self) -> nn.Module:
        """The output layer: it trains at lr x optim.last_lr_scale (restorer.train.optim)."""
        return self.tail

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, {self.options}"
