"""The networks that ship with restorer, in restorer/weights/: trained by the project, loaded by name.

`restore` and `evaluate` take one with `--model NAME`, and DEFAULT_MODEL when neither --model nor
--ckpt is given; `train.init_from=NAME` fine-tunes from one. Each is a safetensors export (restorer.tools.export)
with its card beside it (NAME.json: the network, its training, its photos and its field table).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from restorer.base.cli import UsageError

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
SHIPPED = {  # name -> what it is (the README's "Weights that ship" has their tables)
    "blind-unet5": "every JPEG quality (10-95), colour and gray files: a five-scale U-Net, 4.3 M parameters",
}
DEFAULT_MODEL = "blind-unet5"


def shipped_path(name: str) -> Path:
    """The weights file of the shipped network `name` (a key of SHIPPED)."""
    return WEIGHTS_DIR / f"{name}.safetensors"


def shipped_card(name: str) -> dict:
    """The card beside the shipped network `name`'s weights (its recipe, photos and field table)."""
    return json.loads((WEIGHTS_DIR / f"{name}.json").read_text())


def weights_source(path_or_name: str) -> str:
    """A weights file as given, or the file of the shipped network of that name (when no file has it)."""
    return str(shipped_path(path_or_name)) if path_or_name in SHIPPED and not Path(path_or_name).is_file() else path_or_name


def add_network_options(parser: argparse.ArgumentParser, ckpt_help: str) -> None:
    """--ckpt FILE or --model NAME (one of them; neither: DEFAULT_MODEL), as restore and evaluate say them."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--ckpt", help=f"{ckpt_help} (default: the shipped --model {DEFAULT_MODEL})")
    group.add_argument("--model", choices=sorted(SHIPPED), help=f"a network that ships with restorer, by name "
                       f"(restorer/weights/; default {DEFAULT_MODEL} when no --ckpt is given)")


def chosen_network(args: argparse.Namespace) -> str:
    """The file add_network_options' flags name (--ckpt takes a shipped name too, as train.init_from does)."""
    if args.ckpt is None:
        return str(shipped_path(args.model or DEFAULT_MODEL))
    if not args.ckpt.strip():  # an unset variable in a script: not a request for the shipped network
        raise UsageError("--ckpt is empty: give a checkpoint or exported file, or leave --ckpt out for the shipped network")
    return weights_source(args.ckpt)

