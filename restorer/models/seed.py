"""The original project's network, layer for layer as its document's "Full Architecture" lists it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from restorer.base.choices import Literal, check_choices
from restorer.models.common import check_channels, with_quality_plane


@dataclass
class SeedOptions:
    residual: bool = False  # output = input + network(input); the seed had none
    # none (the seed) | input: the JPEG quality as one more input plane (no scales to modulate)
    conditioning: Literal["none", "input"] = "none"

    def validate(self) -> None:
        check_choices(self)


def conv_unit(c_in: int, c_out: int) -> list[nn.Module]:
    """The document's "Conv Unit": 3x3 conv, 1x1 conv, PReLU, 3x3 conv, PReLU."""
    return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.Conv2d(c_out, c_out, kernel_size=1), nn.PReLU(),
            nn.Conv2d(c_out, c_out, kernel_size=3, padding=1), nn.PReLU()]


class SeedNet(nn.Module):
    """The seed network: 313,066 parameters for RGB, full resolution throughout.

        base: conv unit 3->128, conv unit 128->64, conv unit 64->32, 1x1 32->16 + PReLU
        last: 5x5 16->3

    Args:
        in_channels: 3 for RGB, 1 for grayscale (the output has as many channels).
        residual: if True, output = input + network(input): the network only learns the
            correction to the JPEG image. If False (the seed's behaviour) it outputs the
            restored image directly.

    The submodule names are part of the interface: ``base`` and ``last`` (the optimizer trains
    ``last`` at half the learning rate); the state_dict keys start with ``base.`` and ``last.``.
    """

    Options = SeedOptions
    # its layers are the document's; the presets add the global residual (the seed itself has none)
    PRESETS = {"cpu": {"residual": True}, "gpu": {"residual": True}}

    def __init__(self, in_channels: int = 3, residual: bool = False, conditioning: str = "none") -> None:
        super().__init__()
        c = check_channels(in_channels)
        self.in_channels = c
        self.residual = bool(residual)
        self.options = SeedOptions(self.residual, conditioning)
        self.options.validate()
        self.takes_quality = conditioning != "none"  # (no module of its own: the seed's children stay base, last)
        self.base = nn.Sequential(
            *conv_unit(c + int(self.takes_quality), 128),
            *conv_unit(128, 64),
            *conv_unit(64, 32),
            nn.Conv2d(32, 16, kernel_size=1), nn.PReLU(),
        )  # fmt: skip
        self.last = nn.Conv2d(16, c, kernel_size=5, padding=2)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        """Kaiming-normal (fan_in, a=0.25) for the convolutions in ``base``, a tiny ``last``.

        The document calls `_initialize_weights()` without showing it. Kaiming initialisation with
        the PReLU's initial slope (0.25) keeps the activations' variance roughly constant through
        the stack. ``last`` starts near zero (normal, std 1e-3, zero bias): the residual model then
        starts as (almost) the identity, i.e. it outputs the JPEG input.
        """
        for module in self.base.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0.25, mode="fan_in", nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.last.weight, mean=0.0, std=1e-3)
        nn.init.zeros_(self.last.bias)

    def forward(self, x: torch.Tensor, quality: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.last(self.base(with_quality_plane(x, quality) if self.takes_quality else x))
        return x + y if self.residual else y

    def last_layer(self) -> nn.Module:
        """The output layer: it trains at lr x optim.last_lr_scale (restorer.train.optim)."""
        return self.last

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, residual={self.residual}, conditioning={self.options.conditioning}"
