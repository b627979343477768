"""Tests for restorer.models: the seed network's exact structure and the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from restorer.models import MODELS, SeedNet, build_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_seed_parameter_count():
    assert n_params(SeedNet(3)) == 313_066
    # grayscale: only the first and last convolutions change
    assert n_params(SeedNet(1)) == 313_066 - 2 * 32 * 9 - (2 * 32 * 25 + 2)


def test_seed_structure():
    model = SeedNet()
    assert isinstance(model.base, nn.Sequential)
    assert isinstance(model.last, nn.Conv2d)
    assert model.last.kernel_size == (5, 5) and model.last.padding == (2, 2)
    assert (model.last.in_channels, model.last.out_channels) == (32, 3)
    convs = [m for m in model.base if isinstance(m, nn.Conv2d)]
    prelus = [m for m in model.base if isinstance(m, nn.PReLU)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (3, 32, 3), (32, 64, 3), (64, 128, 3), (128, 128, 3), (128, 96, 1), (96, 64, 3), (64, 32, 1),
    ]  # fmt: skip
    assert len(prelus) == 7
    assert all(p.weight.numel() == 1 and p.weight.item() == pytest.approx(0.25) for p in prelus)
    assert {name for name, _ in model.named_children()} == {"base", "last"}


def test_state_dict_keys():
    keys = list(SeedNet().state_dict())
    assert keys and all(k.startswith(("base.", "last.")) for k in keys)
    assert "last.weight" in keys and "last.bias" in keys and "base.0.weight" in keys


@pytest.mark.parametrize("residual", [False, True])
def test_output_shape_odd_sizes(residual):
    x = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        out = SeedNet(residual=residual)(x)
    assert out.shape == x.shape


def test_initialisation():
    torch.manual_seed(0)
    model = SeedNet()
    assert model.last.weight.std().item() < 2e-3
    assert torch.all(model.last.bias == 0)
    for conv in (m for m in model.base if isinstance(m, nn.Conv2d)):
        assert torch.all(conv.bias == 0)
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        want = (2 / ((1 + 0.25**2) * fan_in)) ** 0.5  # Kaiming, leaky_relu gain with a = 0.25
        assert conv.weight.std().item() == pytest.approx(want, rel=0.15)


def test_residual_starts_near_identity_and_plain_near_zero():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        res = SeedNet(residual=True)(x)
        plain = SeedNet(residual=False)(x)
    # last has std 1e-3 over 32*5*5 inputs: a typical deviation ~0.01, none near the signal
    assert (res - x).abs().mean().item() < 0.02 and (res - x).abs().max().item() < 0.1
    assert plain.abs().mean().item() < 0.02 and plain.abs().max().item() < 0.1


def test_grayscale():
    model = SeedNet(in_channels=1, residual=True)
    x = torch.rand(2, 1, 20, 24)
    with torch.no_grad():
        assert model(x).shape == x.shape
    assert model.last.out_channels == 1


def test_build_model():
    assert MODELS["seed"] is SeedNet
    model = build_model("seed", residual=True)
    assert isinstance(model, SeedNet) and model.residual
    gray = build_model("seed", in_channels=1)
    assert gray.base[0].in_channels == 1 and not gray.residual


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match=r"unknown model 'unet'; choose from: seed") as info:
        build_model("unet")
    assert "\n" not in str(info.value)


def test_build_model_bad_kwargs():
    with pytest.raises(ValueError, match=r"model 'seed'.*'depth'") as info:
        build_model("seed", depth=5)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("seed", in_channels=0)
