"""A photo and a network with different channels: a colour photo through a grayscale network has its
luma restored and keeps its colour; a grayscale photo through a colour network is restored as three
equal channels. Networks whose effect is known (a brightening) make what reached them visible."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from helpers import photo_like
from restorer.base.colour import luma
from restorer.infer.inference import restore_image

LIFT = 0.1  # what the network adds: 25.5 grey levels


class Brighten(torch.nn.Module):
    """out = in + LIFT on every channel: a network whose output says exactly what it was given."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return x * self.scale + LIFT


def _ycc(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb, "RGB").convert("YCbCr")).astype(int)


def test_a_colour_photo_through_a_grayscale_network_has_its_luma_restored_and_keeps_its_colour():
    photo = (photo_like(96, 80, seed=3).astype(int) * 3 // 5).astype(np.uint8)  # dark enough to brighten without clipping
    network = Brighten(1)
    out = restore_image(network, photo, tile=64, overlap=16)
    assert out.shape == photo.shape and out.dtype == np.uint8
    assert all(x.shape[1] == 1 for x in network.inputs)
    before, after = _ycc(photo), _ycc(out)
    lift = after[..., 0] - before[..., 0]
    assert abs(np.median(lift) - 25.5) <= 1 and np.abs(lift - 25.5).max() <= 3  # the luma went through it
    assert np.abs(after[..., 1:] - before[..., 1:]).max() <= 3  # Cb and Cr are kept
    # what reached the network is the JFIF luma (Pillow's "L"), the one grayscale networks train on
    first = network.inputs[0][0, 0].numpy() * 255
    np.testing.assert_allclose(first, luma(photo)[:first.shape[0], :first.shape[1]], atol=0.5)


def test_a_grayscale_photo_through_a_colour_network_goes_through_it_as_three_equal_channels():
    gray = (photo_like(96, 80, seed=4, channels=1)[..., 0].astype(int) * 3 // 5).astype(np.uint8)
    network = Brighten(3)
    out = restore_image(network, gray, tile=64, overlap=16)
    assert out.shape == gray.shape and out.dtype == np.uint8
    assert network.inputs and all(x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
                                  for x in network.inputs)
    lift = out.astype(int) - gray
    assert abs(np.median(lift) - 25.5) <= 1 and np.abs(lift - 25.5).max() <= 2
