"""The networks the trainer can build, by name: ``build_model("seed", residual=True)``."""

from __future__ import annotations

import inspect

from torch import nn

from .seed import SeedNet

MODELS: dict[str, type[nn.Module]] = {"seed": SeedNet}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` in :data:`MODELS` with the keyword arguments.

    Raises ValueError (one line) for an unknown name or an argument the model does not take.
    """
    try:
        cls = MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(sorted(MODELS))}") from None
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad argument for model {name!r}: {exc}") from None
    return cls(**kwargs)


__all__ = ["MODELS", "SeedNet", "build_model"]
