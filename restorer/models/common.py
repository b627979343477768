"""Pieces the networks share: padding to the multiple a U-Net needs, counting what a network costs, and
the conditioning on the JPEG quality."""

from __future__ import annotations

import typing
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from restorer.base.choices import Literal
from restorer.base.ijg import ijg_table


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom and right of N x C x H x W to multiples of `multiple` by replicating the edge
    (a U-Net halves H and W per scale; the caller crops the output back to H x W). Replication, not
    zeros: no artificial edge for the network to restore. No branch on the size: the same graph for
    every H and W, so ONNX and torch.export keep them dynamic."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % multiple, 0, -h % multiple), mode="replicate")


def check_channels(in_channels) -> int:
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels: must be a positive integer, got {in_channels!r}")
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
        x = torch.zeros(1, in_channels, size, size, device=param.device, dtype=param.dtype)
        model(x, torch.full((1,), 50.0, device=param.device)) if getattr(model, "takes_quality", False) else model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total / (size * size)


# ----------------------------------------------------------------------------- conditioning on the JPEG quality

# How a network takes the quality its input's JPEG tables say (restorer.data.jpeg.table_quality):
#   none     it does not (the seed's network, and networks trained on one quality)
#   input    as one more input plane of 1 - q/100 (FFDNet's and DRUNet's noise-level map)
#   decoder  an embedding of 1 - q/100 scales and shifts the decoder's features, per scale (FBCNN's)
#   scales   the same at every scale: encoder, middle and decoder (FiLM, Perez et al. 2018)
Conditioning = Literal["none", "input", "decoder", "scales"]
CONDITIONING = typing.get_args(Conditioning)
# A conditioned network's correction (its output less its input):
#   steps    in units of the input's JPEG quantization step (Conditioned.correction)
#   plain    as the last layer gives it
Correction = Literal["steps", "plain"]
EMBEDDING = 64  # width of the quality embedding (an MLP per image, not per pixel: its cost is nothing)


def quantization_steps() -> torch.Tensor:
    """The mean step of libjpeg's luma table at each IJG quality 1..100, relative to q10's (index q - 1):
    1 at q10, 0.29 at q50, 0.06 at q90, 0.03 at q95 (baseline tables: entries 1..255)."""
    means = np.array([ijg_table(q).mean() for q in range(1, 101)])
    return torch.tensor(means / means[9], dtype=torch.float32)


def quality_feature(quality: torch.Tensor) -> torch.Tensor:
    """What a network sees of the quality: FBCNN's 1 - q/100, N -> N x 1 (float32)."""
    return 1.0 - quality.float().reshape(-1, 1) / 100.0


class QualityEmbedding(nn.Module):
    """FBCNN's quality embedding: 1 - q/100 through a small MLP, N -> N x EMBEDDING."""

    def __init__(self, width: int = EMBEDDING) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, width), nn.ReLU(inplace=True), nn.Linear(width, width),
                                 nn.ReLU(inplace=True))

    def forward(self, quality: torch.Tensor) -> torch.Tensor:
        return self.mlp(quality_feature(quality))


class FiLM(nn.Module):
    """x * (1 + scale(e)) + shift(e), per image and channel, from the quality embedding e. Both start
    at zero: a network starts as it would unconditioned."""

    def __init__(self, channels: int, width: int = EMBEDDING) -> None:
        super().__init__()
        self.scale = nn.Linear(width, channels)
        self.shift = nn.Linear(width, channels)
        for layer in (self.scale, self.shift):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, embedding: Optional[torch.Tensor]) -> torch.Tensor:
        assert embedding is not None
        n, c = x.shape[0], x.shape[1]
        scale = self.scale(embedding).to(x.dtype).reshape(n, c, 1, 1) + 1
        shift = self.shift(embedding).to(x.dtype).reshape(n, c, 1, 1)
        return torch.addcmul(shift, x, scale)  # one pass over the features


class NoFiLM(nn.Module):
    """Where a network's conditioning does not modulate: x as it is (no parameters)."""

    def forward(self, x: torch.Tensor, embedding: Optional[torch.Tensor]) -> torch.Tensor:
        return x


class Conditioned(nn.Module):
    """The quality input of a network: `takes_quality`, its embedding (decoder, scales), its input
    plane (input), and a FiLM (or nothing) for each place a network can modulate."""

    def __init__(self, conditioning: str, correction: str = "steps") -> None:
        super().__init__()
        self.conditioning = conditioning
        self.takes_quality = conditioning != "none"
        self.in_steps = self.takes_quality and correction == "steps"
        # (a buffer, not a global: TorchScript and .to(device) take it along; not in the state dict)
        self.register_buffer("steps", quantization_steps(), persistent=False)
        self.embed = QualityEmbedding() if conditioning in ("decoder", "scales") else None
        self.extra_planes = 1 if conditioning == "input" else 0

    def film(self, channels: int, where: str) -> nn.Module:
        """A FiLM for a place in the encoder, the middle or the decoder (`where`), when the
        conditioning modulates there; else NoFiLM."""
        modulated = {"decoder": ("decoder",), "scales": ("encoder", "middle", "decoder")}.get(self.conditioning, ())
        return FiLM(channels) if where in modulated else NoFiLM()

    def embedding(self, quality: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.embed is None:
            return None
        if quality is None:
            raise ValueError("this network is conditioned on the JPEG quality: give it the input's quality (N,)")
        return self.embed(quality)

    def correction(self, y: torch.Tensor, quality: Optional[torch.Tensor]) -> torch.Tensor:
        """The last layer's output y as the correction to add: in units of the input's quantization
        step (`steps`: y times the mean step of the luma table at q, relative to q10's), or as it is
        (`plain`, and unconditioned networks).

        Why steps: a JPEG's error is about half a step per coefficient, so a correction measured in
        steps has one size at every quality (as a denoiser's residual over the noise level), and a
        network that has not yet learned the high qualities cannot hurt them by more than a share of
        their small steps."""
        if not self.in_steps:
            return y
        assert quality is not None
        index = quality.reshape(-1).round().clamp(1, 100).long() - 1
        return y * self.steps[index].to(y.dtype).reshape(-1, 1, 1, 1)

    def with_planes(self, x: torch.Tensor, quality: Optional[torch.Tensor]) -> torch.Tensor:
        """x, or x with the quality plane after its channels (conditioning `input`)."""
        return with_quality_plane(x, quality) if self.extra_planes else x


def with_quality_plane(x: torch.Tensor, quality: Optional[torch.Tensor]) -> torch.Tensor:
    """x with one more plane, 1 - q/100 everywhere (FFDNet's and DRUNet's level map)."""
    if quality is None:
        raise ValueError("this network is conditioned on the JPEG quality: give it the input's quality (N,)")
    plane = quality_feature(quality).to(x.dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, x.shape[2], x.shape[3])
    return torch.cat([x, plane], dim=1)
