"""The original project's network: a plain stack of 3x3 / 1x1 convolutions with PReLU activations."""

from __future__ import annotations

import torch
from torch import nn


class SeedNet(nn.Module):
    """The seed network (313,066 parameters for RGB), at full resolution throughout.

    Args:
        in_channels: 3 for RGB, 1 for grayscale (the output has as many channels).
        residual: if True, output = input + network(input): the network only learns the
            correction to the JPEG image. If False (the seed's behaviour) it outputs the
            restored image directly.

    The submodule names are part of the interface: ``base`` (the feature stack) and ``last``
    (the 5x5 output convolution, which the optimizer trains at half the learning rate); the
    state_dict keys start with ``base.`` and ``last.``.
    """

    def __init__(self, in_channels: int = 3, residual: bool = False) -> None:
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        c = in_channels
        self.in_channels = c
        self.residual = bool(residual)
        self.base = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.PReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.PReLU(),
            nn.Conv2d(64, 128, 3, padding=1), nn.PReLU(),
            nn.Conv2d(128, 128, 3, padding=1), nn.PReLU(),
            nn.Conv2d(128, 96, 1), nn.PReLU(),
            nn.Conv2d(96, 64, 3, padding=1), nn.PReLU(),
            nn.Conv2d(64, 32, 1), nn.PReLU(),
        )  # fmt: skip
        self.last = nn.Conv2d(32, c, 5, padding=2)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        """Kaiming-normal (fan_in, a=0.25) for the convolutions in ``base``, a tiny ``last``.

        Kaiming initialisation with the PReLU's initial slope (0.25) keeps the activations'
        variance roughly constant through the seven conv+PReLU layers, so the stack trains
        from the start without vanishing or exploding signals. ``last`` starts near zero
        (normal, std 1e-3, zero bias): the residual model then starts as (almost) the
        identity, i.e. it outputs the JPEG input, and the plain model starts near zero output.
        """
        for module in self.base.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0.25, mode="fan_in", nonlinearity="leaky_relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.last.weight, mean=0.0, std=1e-3)
        if self.last.bias is not None:
            nn.init.zeros_(self.last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.last(self.base(x))
        return x + y if self.residual else y

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, residual={self.residual}"
