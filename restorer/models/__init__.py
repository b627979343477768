"""The networks the trainer can build, by name: ``build_model("unet", in_channels=3, blocks=2)``.

Each network class has ``Options`` (a dataclass of its typed options, defaults = its CPU budget)
and ``PRESETS`` (named option sets: ``cpu`` and ``gpu``); the config's ``model.<name>`` section
holds the options and ``model.preset`` picks a preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from restorer.models.common import CONDITIONING, count_parameters, macs_per_pixel
from restorer.models.dncnn import DnCNN, DnCNNOptions
from restorer.models.nafnet import NAFNet, NAFNetOptions
from restorer.models.seed import SeedNet, SeedOptions
from restorer.models.unet import UNet, UNetOptions

MODELS: dict[str, type[nn.Module]] = {"seed": SeedNet, "dncnn": DnCNN, "unet": UNet, "nafnet": NAFNet}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` in :data:`MODELS` with the keyword arguments.

    Raises ValueError (one line) for an unknown name or an argument the model does not take.
    """
    try:
        cls = MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(sorted(MODELS))}") from None
    try:
        return cls(**kwargs)
    except TypeError as exc:  # an option the network does not have
        raise ValueError(f"bad argument for model {name!r}: {exc}") from None


@dataclass(frozen=True)
class NetworkSpec:
    """Everything that rebuilds a network and says how to feed it: its name in MODELS, its options
    (its conditioning on the JPEG quality among them), its channels, and whether it restores
    luma (a grayscale network) or colour. Checkpoints and exported cards carry it."""

    name: str
    options: dict = field(default_factory=dict)
    in_channels: int = 3
    grayscale: bool = False

    @property
    def conditioning(self) -> str:
        return str(self.options.get("conditioning", "none"))

    @property
    def takes_quality(self) -> bool:
        """Whether the network's forward takes the input's JPEG quality (N,) beside the image."""
        return self.conditioning != "none"

    def build(self) -> nn.Module:
        return build_model(self.name, in_channels=self.in_channels, **self.options)

    def to_dict(self) -> dict:
        return {"name": self.name, "options": dict(self.options), "in_channels": self.in_channels,
                "grayscale": self.grayscale}

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkSpec":
        return cls(str(d["name"]), dict(d.get("options") or {}), int(d["in_channels"]), bool(d["grayscale"]))


def load_weights(model: nn.Module, state_dict: dict, source: str) -> None:
    """`model.load_state_dict(state_dict)`, or ValueError in one line that says what does not fit. A
    tensor stored in an earlier layout of the same values (NAFNet's scales were 1 x C x 1 x 1, are C)
    is reshaped: singleton dimensions are the one layout change networks here have had."""
    own = model.state_dict()
    state_dict = {k: relaid(v, own[k].shape) if k in own else v for k, v in state_dict.items()}
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or extra or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("unexpected", extra), ("of another shape", wrong)) if v]
        raise ValueError(f"{source}: the weights do not fit {type(model).__name__}: {', '.join(parts)}")
    model.load_state_dict(state_dict)


def relaid(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`t` in `shape` when the two differ only in singleton dimensions (the same values), else `t`."""
    if not isinstance(t, torch.Tensor) or t.shape == shape:
        return t
    same = tuple(d for d in t.shape if d != 1) == tuple(d for d in shape if d != 1)
    return t.reshape(shape) if same else t


def describe(model: nn.Module, name: str) -> str:
    """One line: the network, its options, parameters and MACs per pixel."""
    opts = dataclasses.asdict(model.options)
    text = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in opts.items())
    c = model.in_channels
    return (f"{name} ({text}; {'RGB' if c == 3 else f'{c} channel'}): {count_parameters(model):,} parameters, "
            f"{macs_per_pixel(model, c) / 1e3:,.1f} k MACs per pixel")


__all__ = ["CONDITIONING", "MODELS", "DnCNN", "DnCNNOptions", "NAFNet", "NAFNetOptions", "NetworkSpec", "SeedNet", "SeedOptions",
           "UNet", "UNetOptions", "build_model", "count_parameters", "describe", "load_weights", "macs_per_pixel"]
