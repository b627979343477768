"""The networks the trainer can build, by name: ``build_model("unet", in_channels=3, blocks=2)``.

Each network class has ``Options`` (a dataclass of its typed options, defaults = its CPU budget)
and ``PRESETS`` (named option sets: ``cpu`` and ``gpu``); the config's ``model.<name>`` section
holds the options and ``model.preset`` picks a preset.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from restorer.models.common import count_parameters, macs_per_pixel
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


def load_weights(model: nn.Module, state_dict: dict, source: str) -> None:
    """`model.load_state_dict(state_dict)`, or ValueError in one line that says what does not fit.

    A checkpoint of the seed network's first layout (before it followed the original document's
    layer list; its first layer was 3->32) is recognised and named as such.
    """
    first = state_dict.get("base.0.weight")
    if isinstance(model, SeedNet) and first is not None and tuple(first.shape[:1]) == (32,):
        raise ValueError(f"{source} holds the seed network's old layout (first layer 3->32, not the document's "
                         "3->128); it cannot be loaded into today's SeedNet: train it again")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or extra or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("unexpected", extra), ("of another shape", wrong)) if v]
        raise ValueError(f"{source}: the weights do not fit {type(model).__name__}: {', '.join(parts)}")
    model.load_state_dict(state_dict)


def describe(model: nn.Module, name: str) -> str:
    """One line: the network, its options, parameters and MACs per pixel."""
    opts = dataclasses.asdict(model.options)
    text = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in opts.items())
    c = model.in_channels
    return (f"{name} ({text}; {'RGB' if c == 3 else f'{c} channel'}): {count_parameters(model):,} parameters, "
            f"{macs_per_pixel(model, c) / 1e3:,.1f} k MACs per pixel")


__all__ = ["MODELS", "DnCNN", "DnCNNOptions", "NAFNet", "NAFNetOptions", "SeedNet", "SeedOptions",
           "UNet", "UNetOptions", "build_model", "count_parameters", "describe", "load_weights", "macs_per_pixel"]
